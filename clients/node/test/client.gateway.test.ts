/**
 * The Node client against a real gateway (`tokenrelay serve --port 0`, the
 * simulated model) over a real port, through a TCP proxy that resets
 * connections for real.
 */
import { strict as assert } from 'node:assert';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import {
  GenerationFailed,
  ReconnectsExhausted,
  RelayClient,
  type RelayClientOptions,
  type RelayEvent,
  ResumeRejected,
  StreamFailed,
  textSha256,
} from '../src/index';
import { FaultProxy } from './support/faultProxy';
import { type Gateway, startGateway } from './support/gateway';
import { PROMPT, chunksOf, collect, range, rejection, textOf } from './support/kit';
import { recordingSleep } from './support/scriptedRelay';

let gateway: Gateway;
const clients: RelayClient[] = [];
const proxies: FaultProxy[] = [];

before(async () => {
  gateway = await startGateway();
});

after(async () => {
  for (const client of clients) {
    client.close();
  }
  for (const proxy of proxies) {
    await proxy.close();
  }
  await gateway.stop();
});

function clientOf(address: string, options: RelayClientOptions = {}): RelayClient {
  const client = new RelayClient(address, options);
  clients.push(client);
  return client;
}

async function proxyToGateway(): Promise<FaultProxy> {
  const proxy = await FaultProxy.for(gateway.address);
  proxies.push(proxy);
  return proxy;
}

async function referenceText(maxTokens: number, seed: string): Promise<string> {
  const result = await clientOf(gateway.address).generate('sim', PROMPT, {
    maxTokens,
    metadata: { 'sim.seed': seed },
  });
  return result.text;
}

describe('a clean stream', () => {
  test('is contiguous and verified', async () => {
    const relayStream = clientOf(gateway.address).stream('sim', PROMPT, { maxTokens: 45 });
    const events = await collect(relayStream);
    const first = events[0];
    assert.ok(first?.type === 'started' && !first.resumed);
    assert.deepEqual(chunksOf(events).map((c) => c.seq), range(1, 45));
    const end = events.at(-1);
    assert.ok(end?.type === 'end');
    assert.ok(end.verified && !end.partial && end.totalSeq === 45);
    assert.equal(end.textSha256, textSha256(textOf(events)));
    assert.deepEqual([relayStream.reconnects, relayStream.duplicatesDropped], [0, 0]);
  });

  test('generate collects the verified text', async () => {
    const result = await clientOf(gateway.address).generate('sim', PROMPT, { maxTokens: 20 });
    assert.equal(result.chunks, 20);
    assert.equal(result.end.textSha256, textSha256(result.text));
    assert.deepEqual([result.reasoning, result.toolCalls], ['', []]);
  });

  test('checkpoints come every checkpointInterval chunks with a fresh token', async () => {
    const events = await collect(
      clientOf(gateway.address).stream('sim', PROMPT, { maxTokens: 12, policy: { checkpointInterval: 5 } }),
    );
    const checkpoints = events.filter((event) => event.type === 'checkpoint');
    assert.deepEqual(checkpoints.map((event) => event.type === 'checkpoint' && event.seq), [5, 10]);
    assert.ok(checkpoints.every((event) => event.type === 'checkpoint' && event.resumeToken.startsWith('v2.')));
  });
});

describe('a broken connection', () => {
  test('a cut mid-stream is resumed seamlessly: every seq once, the exact text, the digest', async () => {
    const expected = await referenceText(40, 'cut');
    const proxy = await proxyToGateway();
    const { sleep, delays } = recordingSleep();
    const relayStream = clientOf(proxy.address, { reconnect: { sleep } }).stream('sim', PROMPT, {
      maxTokens: 40,
      metadata: { 'sim.pace_ms': '10', 'sim.seed': 'cut' },
    });
    const events: RelayEvent[] = [];
    for await (const event of relayStream) {
      events.push(event);
      if (event.type === 'chunk' && event.seq === 10) {
        assert.equal(proxy.cutAll(), 1);
      }
    }
    assert.deepEqual(chunksOf(events).map((c) => c.seq), range(1, 40), 'every seq exactly once, in order');
    assert.equal(relayStream.text, expected);
    assert.equal(relayStream.reconnects, 1);
    assert.equal(relayStream.duplicatesDropped, 0);
    assert.ok(events.some((event) => event.type === 'reconnected' && event.lastSeq >= 10));
    assert.equal(events.filter((event) => event.type === 'started' && event.resumed).length, 1);
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.verified && end.totalSeq === 40);
    assert.equal(delays.length, 1);
    assert.equal(proxy.connectionsAccepted, 2);
  });

  test('an unreachable gateway exhausts the reconnects, and the stream resumes later', async () => {
    const expected = await referenceText(30, 'gone');
    const proxy = await proxyToGateway();
    const { sleep, delays } = recordingSleep();
    // Each reconnect waits up to connectTimeoutMs for a connection the proxy
    // keeps resetting; keep that window short.
    const client = clientOf(proxy.address, { reconnect: { sleep, maxAttempts: 3, connectTimeoutMs: 300 } });
    const relayStream = client.stream('sim', PROMPT, {
      maxTokens: 30,
      metadata: { 'sim.pace_ms': '10', 'sim.seed': 'gone' },
    });
    const error = await rejection(
      (async () => {
        for await (const event of relayStream) {
          if (event.type === 'chunk' && event.seq === 5) {
            proxy.refuseNew = true;
            proxy.cutAll();
          }
        }
      })(),
    );
    assert.ok(error instanceof ReconnectsExhausted && error.partial !== null);
    const partial = error.partial;
    assert.ok(partial.lastSeq >= 5);
    assert.equal(partial.text, expected.slice(0, partial.text.length));
    assert.equal(delays.length, 3);

    // The gateway kept the generation running; once the network is back the
    // partial stream resumes and the whole digest checks out.
    proxy.refuseNew = false;
    const resumed = client.resume(partial);
    const events = await collect(resumed);
    assert.deepEqual(chunksOf(events).map((c) => c.seq), range(partial.lastSeq + 1, 30));
    assert.equal(resumed.text, expected);
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.verified);
  });

  test('a gateway never reached is reported by its connection error', async () => {
    const client = clientOf('127.0.0.1:1', {
      reconnect: { sleep: recordingSleep().sleep, maxAttempts: 1, connectTimeoutMs: 300 },
    });
    const error = await rejection(collect(client.stream('sim', PROMPT)));
    assert.ok(error instanceof ReconnectsExhausted);
    assert.match(error.cause, /ECONNREFUSED|Connection refused|No connection established/i);
  });
});

describe('terminal statuses', () => {
  test('an unknown model fails at once with INVALID_ARGUMENT, never retried', async () => {
    const proxy = await proxyToGateway();
    const { sleep, delays } = recordingSleep();
    const error = await rejection(clientOf(proxy.address, { reconnect: { sleep } }).generate('no-such-model', PROMPT));
    assert.ok(error instanceof StreamFailed && !(error instanceof ResumeRejected));
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.match(error.details, /start\.model/);
    assert.deepEqual(delays, []);
    assert.equal(proxy.connectionsAccepted, 1);
  });

  test('a forged resume token is PERMISSION_DENIED, a ResumeRejected, never retried', async () => {
    const { sleep, delays } = recordingSleep();
    const error = await rejection(
      collect(clientOf(gateway.address, { reconnect: { sleep } }).resume('v1.forged.1.x', 0)),
    );
    assert.ok(error instanceof ResumeRejected);
    assert.equal(error.code, grpc.status.PERMISSION_DENIED);
    assert.match(error.details, /resume\.resume_token/);
    assert.deepEqual(delays, []);
  });

  test('a refused partial that is UNAVAILABLE is a GenerationFailed with the typed error, never resumed', async () => {
    const proxy = await proxyToGateway();
    const { sleep, delays } = recordingSleep();
    const relayStream = clientOf(proxy.address, { reconnect: { sleep } }).stream('sim', PROMPT, {
      maxTokens: 30,
      metadata: { 'sim.faults': 'reset@5' },
      policy: { allowPartial: false, maxRetries: 0, allowFallback: false },
    });
    const error = await rejection(collect(relayStream));
    assert.ok(error instanceof GenerationFailed, String(error));
    assert.equal(error.code, grpc.status.UNAVAILABLE);
    assert.equal(error.error.code, 'ECONNRESET');
    assert.equal(error.error.type, 'network');
    assert.ok(error.error.retryable && error.error.fatal);
    // What the gateway says it delivered is what the client holds (checked
    // by the client, or it would be a DigestMismatch).
    assert.equal(error.delivered.totalSeq, 5);
    assert.equal(error.partial?.lastSeq, 5);
    assert.equal(error.delivered.textSha256, textSha256(error.partial?.text ?? ''));
    assert.deepEqual(delays, []);
    assert.equal(proxy.connectionsAccepted, 1);
  });

  test('a refused partial that is not retryable is FAILED_PRECONDITION with no chunks', async () => {
    const error = await rejection(
      clientOf(gateway.address).generate('sim', PROMPT, {
        metadata: { 'sim.faults': 'http:401' },
        policy: { allowPartial: false },
      }),
    );
    assert.ok(error instanceof GenerationFailed);
    assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
    assert.ok(!error.error.retryable);
    assert.equal(error.error.code, 'HTTP_401');
    assert.equal(error.partial?.lastSeq, 0);
  });

  test('the same failure with partials allowed is a partial end, not an error', async () => {
    const result = await clientOf(gateway.address).generate('sim', PROMPT, {
      maxTokens: 30,
      metadata: { 'sim.faults': 'reset@5' },
      policy: { maxRetries: 0, allowFallback: false },
    });
    assert.ok(result.end.partial && result.end.verified);
    assert.equal(result.end.error?.code, 'ECONNRESET');
    assert.equal(result.chunks, 5);
    await assert.rejects(
      clientOf(gateway.address).generate('sim', PROMPT, {
        maxTokens: 30,
        metadata: { 'sim.faults': 'reset@5' },
        policy: { maxRetries: 0, allowFallback: false },
        strict: true,
      }),
      { name: 'PartialAnswer' },
    );
  });
});

describe('attaching, cancelling, leaving', () => {
  test('the same idempotency key attaches to the same stream', async () => {
    const client = clientOf(gateway.address);
    const first = await client.generate('sim', PROMPT, { maxTokens: 10, idempotencyKey: 'node-key-1' });
    const second = await client.generate('sim', PROMPT, { maxTokens: 10, idempotencyKey: 'node-key-1' });
    assert.equal(second.streamId, first.streamId);
    assert.equal(second.text, first.text);
  });

  test('cancel ends the stream with finish "cancelled"', async () => {
    const relayStream = clientOf(gateway.address).stream('sim', PROMPT, {
      maxTokens: 200,
      metadata: { 'sim.pace_ms': '20' },
    });
    const events: RelayEvent[] = [];
    for await (const event of relayStream) {
      events.push(event);
      if (event.type === 'chunk' && event.seq === 3) {
        relayStream.cancel('enough');
      }
    }
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.finishReason === 'cancelled' && end.verified);
    assert.ok(end.totalSeq < 200);
  });

  test('leaving early keeps the generation for a later resume', async () => {
    const expected = await referenceText(25, 'leave');
    const client = clientOf(gateway.address);
    const relayStream = client.stream('sim', PROMPT, {
      maxTokens: 25,
      metadata: { 'sim.pace_ms': '10', 'sim.seed': 'leave' },
    });
    for await (const event of relayStream) {
      if (event.type === 'chunk' && event.seq === 4) {
        break;
      }
    }
    const resumed = client.resume(relayStream.partial());
    const result = await resumed.collect();
    assert.equal(result.text, expected);
    assert.ok(result.end.verified);
  });
});
