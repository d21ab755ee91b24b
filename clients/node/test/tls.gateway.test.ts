/**
 * The Node client's credentials (issue 13): TLS and mTLS against a real
 * gateway (`tokenrelay serve --tls-cert … [--tls-client-ca …]`) with
 * certificates the test makes (tests/tlskit.py, run with the repository's
 * Python), and the API key sent as `authorization: Bearer <key>`.
 */
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { ReconnectsExhausted, RelayClient, type RelayClientOptions, StreamFailed } from '../src/index';
import { REPO_ROOT, type Gateway, startGateway, tokenrelayBinary } from './support/gateway';
import { PROMPT } from './support/kit';
import { ScriptedRelay } from './support/scriptedRelay';

const KEY = 'trk_node_canary_0123456789abcdef';
let certs: string;
const clients: RelayClient[] = [];

function file(name: string): string {
  return path.join(certs, name);
}

function client(address: string, options: RelayClientOptions = {}): RelayClient {
  const made = new RelayClient(address, { reconnect: { maxAttempts: 0 }, ...options });
  clients.push(made);
  return made;
}

before(() => {
  certs = mkdtempSync(path.join(tmpdir(), 'tokenrelay-node-tls-'));
  const python = path.join(path.dirname(tokenrelayBinary()), 'python');
  execFileSync(python, [path.join(REPO_ROOT, 'tests', 'tlskit.py'), certs]);
});

after(() => {
  for (const made of clients) made.close();
  rmSync(certs, { recursive: true, force: true });
});

describe('a TLS gateway', () => {
  let gateway: Gateway;
  before(async () => {
    gateway = await startGateway(['--tls-cert', file('server.crt'), '--tls-key', file('server.key')]);
  });
  after(async () => {
    await gateway.stop();
  });

  test('serves a client that trusts its CA (a path or the PEM itself)', async () => {
    for (const tlsCa of [file('ca.crt'), readFileSync(file('ca.crt'))]) {
      const result = await client(gateway.address, { tlsCa }).generate('sim', PROMPT, { maxTokens: 8 });
      assert.equal(result.chunks, 8);
      assert.ok(result.end.verified && !result.end.partial);
    }
  });

  test('refuses a plaintext client, which says what to pass', async () => {
    await assert.rejects(
      client(gateway.address).generate('sim', PROMPT),
      (error: unknown) => error instanceof ReconnectsExhausted && /pass tlsCa/.test(error.message),
    );
  });

  test('is refused by a client that trusts another CA', async () => {
    await assert.rejects(
      client(gateway.address, { tlsCa: file('other/ca.crt') }).generate('sim', PROMPT),
      (error: unknown) =>
        error instanceof ReconnectsExhausted && /not one tlsCa signed/.test(error.message),
    );
  });
});

describe('an mTLS gateway', () => {
  let gateway: Gateway;
  before(async () => {
    gateway = await startGateway([
      '--tls-cert', file('server.crt'), '--tls-key', file('server.key'),
      '--tls-client-ca', file('ca.crt'),
    ]);
  });
  after(async () => {
    await gateway.stop();
  });

  test('serves a client certificate its CA signed', async () => {
    const result = await client(gateway.address, {
      tlsCa: file('ca.crt'),
      tlsClientCert: file('client.crt'),
      tlsClientKey: file('client.key'),
    }).generate('sim', PROMPT, { maxTokens: 8 });
    assert.ok(result.end.verified && result.chunks === 8);
  });

  test('refuses a client without a certificate, which says what to pass', async () => {
    await assert.rejects(
      client(gateway.address, { tlsCa: file('ca.crt') }).generate('sim', PROMPT),
      (error: unknown) =>
        error instanceof ReconnectsExhausted && /pass tlsClientCert and tlsClientKey/.test(error.message),
    );
  });

  test('refuses a client certificate another CA signed', async () => {
    await assert.rejects(
      client(gateway.address, {
        tlsCa: file('ca.crt'),
        tlsClientCert: file('stranger.crt'),
        tlsClientKey: file('stranger.key'),
      }).generate('sim', PROMPT),
      ReconnectsExhausted,
    );
  });
});

describe('the API key', () => {
  const refusal = [{ status: grpc.status.UNAUTHENTICATED, details: 'no such key' }];

  test('goes with every call as a bearer token, from the option or $TOKENRELAY_API_KEY', async () => {
    const relay = new ScriptedRelay([refusal]);
    const address = await relay.start();
    try {
      await assert.rejects(client(address, { apiKey: KEY }).generate('sim', PROMPT), StreamFailed);
      process.env['TOKENRELAY_API_KEY'] = KEY;
      try {
        await assert.rejects(client(address).generate('sim', PROMPT), StreamFailed);
      } finally {
        delete process.env['TOKENRELAY_API_KEY'];
      }
      await assert.rejects(client(address).generate('sim', PROMPT), StreamFailed);
      assert.deepEqual(
        relay.callMetadata.map((metadata) => metadata['authorization']),
        [`Bearer ${KEY}`, `Bearer ${KEY}`, undefined],
      );
    } finally {
      await relay.stop();
    }
  });

  test('that is not printable ASCII, or half a client certificate, is refused at once', () => {
    assert.throws(() => new RelayClient('127.0.0.1:1', { apiKey: 'two words' }), /printable ASCII/);
    assert.throws(
      () => new RelayClient('127.0.0.1:1', { tlsClientCert: file('client.crt') }),
      /tlsClientCert is given but tlsClientKey is not/,
    );
    assert.throws(
      () => new RelayClient('127.0.0.1:1', { tlsCa: '/nowhere/ca.pem' }),
      /tlsCa "\/nowhere\/ca.pem" cannot be read \(ENOENT\)/,
    );
  });
});

describe('examples/chat.mjs', () => {
  let gateway: Gateway;
  before(async () => {
    gateway = await startGateway([
      '--tls-cert', file('server.crt'), '--tls-key', file('server.key'),
      '--tls-client-ca', file('ca.crt'),
    ]);
  });
  after(async () => {
    await gateway.stop();
  });

  test('takes --tls-ca, --tls-client-cert and --tls-client-key', () => {
    const example = path.join(__dirname, '..', '..', 'examples', 'chat.mjs');
    const answer = execFileSync(process.execPath, [
      example,
      '--tls-ca', file('ca.crt'),
      '--tls-client-cert', file('client.crt'), '--tls-client-key', file('client.key'),
      gateway.address, 'hello over mTLS',
    ], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    assert.ok(answer.trim().length > 0);
  });
});
