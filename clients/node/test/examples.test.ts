/** The examples in examples/ run against a real gateway as a user runs them. */
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { RelayClient } from '../src/index';
import { type Gateway, startGateway } from './support/gateway';

const run = promisify(execFile);
const PACKAGE_ROOT = path.resolve(__dirname, '..', '..');

let gateway: Gateway;

before(async () => {
  gateway = await startGateway();
});

after(async () => {
  await gateway.stop();
});

test('chat.mjs prints the verified answer on stdout and its summary on stderr', async () => {
  const prompt = 'how do streams survive?';
  const client = new RelayClient(gateway.address);
  const expected = await client.generate('sim', [['user', prompt]]);
  client.close();
  const { stdout, stderr } = await run(
    process.execPath,
    [path.join(PACKAGE_ROOT, 'examples', 'chat.mjs'), gateway.address, prompt],
    { cwd: PACKAGE_ROOT },
  );
  assert.equal(stdout, `${expected.text}\n`);
  assert.match(stderr, new RegExp(`\\[stop: ${expected.chunks} chunks, sha256 ${expected.end.textSha256.slice(0, 12)}… verified, 0 reconnect\\(s\\)\\]`));
});
