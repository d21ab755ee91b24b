/** The examples in examples/ run against a real gateway as a user runs them. */
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { RelayClient, assistantMessage, toolResult } from '../src/index';
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

test('agent.mjs runs the loop: the tool call, its result sent back, the final answer', async () => {
  const question = 'What is the weather in Oslo?';
  const tools = [
    {
      name: 'get_weather',
      description: 'The current weather of a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  ];
  // The same loop through the client: what the example must print.
  const client = new RelayClient(gateway.address);
  const first = await client.generate('sim', [['user', question]], { tools, maxTokens: 40 });
  assert.equal(first.end.finishReason, 'tool_calls');
  const [call] = first.toolCalls;
  assert.ok(call !== undefined);
  const { city } = JSON.parse(call.arguments) as { city: string };
  const result = JSON.stringify({ city, temperature_c: 7, sky: 'overcast' });
  const second = await client.generate(
    'sim',
    [['user', question], assistantMessage(first), toolResult(call.id, result)],
    { tools, maxTokens: 40 },
  );
  client.close();

  const { stdout, stderr } = await run(
    process.execPath,
    [path.join(PACKAGE_ROOT, 'examples', 'agent.mjs'), gateway.address, question],
    { cwd: PACKAGE_ROOT },
  );
  assert.equal(stdout, `${first.text}\n${second.text}\n`);
  assert.match(stderr, /\[turn 1: tool_calls, \d+ chunks, every chunk verified\]/);
  assert.ok(stderr.includes(`[get_weather(${call.arguments}) -> ${result}]`), stderr);
  assert.match(stderr, /\[turn 2: stop, 40 chunks, every chunk verified\]/);
});
