/**
 * Agent streams through the Node client against a real gateway (the
 * simulated model streams reasoning with `sim.reasoning`, and a tool call
 * when the request offers tools and ends with a user message): an agent loop,
 * reasoning, tool calls WHOLE and STREAM, breaks inside a tool call on the
 * client's connection and upstream. Every end is checked against both of the
 * server's digests (chunks_sha256 written by the Python gateway, checked by
 * this client's own encoder).
 */
import { strict as assert } from 'node:assert';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import {
  GenerationFailed,
  type GenerateResult,
  type MessageInput,
  RelayClient,
  type RelayClientOptions,
  type RelayEvent,
  type ToolInput,
  assistantMessage,
  toolResult,
} from '../src/index';
import { FaultProxy } from './support/faultProxy';
import { type Gateway, startGateway } from './support/gateway';
import { chunksOf, range, rejection } from './support/kit';
import { recordingSleep } from './support/scriptedRelay';

const WEATHER: ToolInput = {
  name: 'get_weather',
  description: 'The current weather of a city',
  parameters: {
    type: 'object',
    properties: {
      city: { type: 'string' },
      country: { type: 'string' },
      days: { type: 'integer' },
      metric: { type: 'boolean' },
    },
    required: ['city'],
  },
};
const QUESTION: MessageInput[] = [['user', 'What is the weather in Oslo?']];

let gateway: Gateway;
const clients: RelayClient[] = [];
const proxies: FaultProxy[] = [];

before(async () => {
  gateway = await startGateway(['--backoff-base-s', '0']);
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

function assertOneValidCall(result: GenerateResult): void {
  assert.equal(result.end.finishReason, 'tool_calls');
  assert.equal(result.toolCalls.length, 1, JSON.stringify(result.toolCalls));
  const [call] = result.toolCalls;
  assert.ok(call !== undefined && call.id !== '');
  assert.equal(call.name, 'get_weather');
  const args: unknown = JSON.parse(call.arguments);
  assert.ok(typeof args === 'object' && args !== null && 'city' in args, call.arguments);
}

function assertFullyVerified(result: GenerateResult): void {
  assert.ok(result.end.verified, 'text_sha256 checked');
  assert.ok(result.end.chunksVerified, 'chunks_sha256 checked');
  assert.equal(result.chunks, result.end.totalSeq);
}

describe('an agent loop', () => {
  test('a tool call, its result sent back, then the final answer', async () => {
    const client = clientOf(gateway.address);
    const messages: MessageInput[] = [...QUESTION];
    const turn = await client.generate('sim', messages, { tools: [WEATHER] });
    assertOneValidCall(turn);
    assertFullyVerified(turn);

    messages.push(assistantMessage(turn));
    for (const call of turn.toolCalls) {
      const { city } = JSON.parse(call.arguments) as { city: string };
      messages.push(toolResult(call.id, JSON.stringify({ city, temperature_c: 7, sky: 'overcast' })));
    }
    const answer = await client.generate('sim', messages, { tools: [WEATHER], maxTokens: 20 });
    assert.equal(answer.end.finishReason, 'stop');
    assert.deepEqual(answer.toolCalls, []);
    assert.ok(answer.text.length > 0);
    assert.equal(answer.chunks, 20);
    assertFullyVerified(answer);
  });

  test('a tool result that names no earlier call is INVALID_ARGUMENT naming the field', async () => {
    const error = await rejection(
      clientOf(gateway.address).generate('sim', [...QUESTION, toolResult('call_nobody', '{}')], {
        tools: [WEATHER],
      }),
    );
    assert.ok(error instanceof Error && 'code' in error);
    assert.equal((error as { code: unknown }).code, grpc.status.INVALID_ARGUMENT);
    assert.match(error.message, /messages\[1\]/);
  });

  test('tool choice "none" answers with text', async () => {
    const result = await clientOf(gateway.address).generate('sim', QUESTION, {
      tools: [WEATHER],
      toolChoice: 'none',
      maxTokens: 8,
    });
    assert.deepEqual(result.toolCalls, []);
    assert.equal(result.end.finishReason, 'stop');
    assertFullyVerified(result);
  });
});

describe('reasoning', () => {
  test('is relayed before the answer, apart from its text, and verified', async () => {
    const events: RelayEvent[] = [];
    const relayStream = clientOf(gateway.address).stream('sim', QUESTION, {
      maxTokens: 10,
      metadata: { 'sim.reasoning': '4' },
    });
    for await (const event of relayStream) {
      events.push(event);
    }
    const kinds = chunksOf(events).map((chunk) => chunk.kind);
    assert.deepEqual(kinds.slice(0, 4), ['reasoning', 'reasoning', 'reasoning', 'reasoning']);
    assert.ok(kinds.slice(4).every((kind) => kind === 'text'));
    const result = await clientOf(gateway.address).generate('sim', QUESTION, {
      maxTokens: 10,
      metadata: { 'sim.reasoning': '4' },
    });
    assert.equal(relayStream.reasoning, result.reasoning);
    assert.ok(result.reasoning.length > 0);
    assert.equal(result.text, relayStream.text);
    assertFullyVerified(result);
  });

  test('a connection cut inside the reasoning is resumed without repeating any of it', async () => {
    const metadata = { 'sim.reasoning': '12', 'sim.pace_ms': '10', 'sim.seed': 'think' };
    const reference = await clientOf(gateway.address).generate('sim', QUESTION, { maxTokens: 10, metadata });
    const proxy = await FaultProxy.for(gateway.address);
    proxies.push(proxy);
    const relayStream = clientOf(proxy.address, { reconnect: { sleep: recordingSleep().sleep } }).stream(
      'sim',
      QUESTION,
      { maxTokens: 10, metadata },
    );
    for await (const event of relayStream) {
      if (event.type === 'chunk' && event.seq === 5) {
        assert.equal(event.kind, 'reasoning');
        proxy.cutAll();
      }
    }
    assert.equal(relayStream.reconnects, 1);
    assert.equal(relayStream.reasoning, reference.reasoning);
    assert.equal(relayStream.text, reference.text);
    assert.ok(relayStream.end?.chunksVerified);
  });
});

describe('tool calls', () => {
  test('WHOLE mode (the default) sends the call as one chunk; STREAM mode in pieces that join to it', async () => {
    const client = clientOf(gateway.address);
    const whole: RelayEvent[] = [];
    for await (const event of client.stream('sim', QUESTION, { tools: [WEATHER] })) {
      whole.push(event);
    }
    const streamed = client.stream('sim', QUESTION, { tools: [WEATHER], policy: { toolCalls: 'stream' } });
    const pieces: RelayEvent[] = [];
    for await (const event of streamed) {
      pieces.push(event);
    }
    const wholeCalls = chunksOf(whole).filter((chunk) => chunk.kind === 'toolCall');
    const pieceCalls = chunksOf(pieces).filter((chunk) => chunk.kind === 'toolCall');
    assert.equal(wholeCalls.length, 1);
    assert.ok(pieceCalls.length > 2, `${pieceCalls.length} pieces`);
    const [only] = wholeCalls;
    assert.ok(only?.kind === 'toolCall');
    assert.deepEqual(streamed.toolCalls(), [
      { id: only.toolCall.id, name: only.toolCall.name, arguments: only.toolCall.arguments },
    ]);
    const end = pieces.at(-1);
    assert.ok(end?.type === 'end' && end.chunksVerified && end.finishReason === 'tool_calls');
  });

  test('a connection cut between a streamed call\u2019s pieces is resumed: the call is assembled once, exactly', async () => {
    const metadata = { 'sim.pace_ms': '10', 'sim.seed': 'cut-call' };
    const options = { tools: [WEATHER], metadata, policy: { toolCalls: 'stream' as const } };
    const reference = await clientOf(gateway.address).generate('sim', QUESTION, options);
    const proxy = await FaultProxy.for(gateway.address);
    proxies.push(proxy);
    const relayStream = clientOf(proxy.address, { reconnect: { sleep: recordingSleep().sleep } }).stream(
      'sim',
      QUESTION,
      options,
    );
    const seqs: number[] = [];
    let toolPieces = 0;
    for await (const event of relayStream) {
      if (event.type === 'chunk') {
        seqs.push(event.seq);
        if (event.kind === 'toolCall' && ++toolPieces === 2) {
          proxy.cutAll();
        }
      }
    }
    assert.equal(relayStream.reconnects, 1);
    assert.deepEqual(seqs, range(1, reference.chunks));
    assert.deepEqual(relayStream.toolCalls(), reference.toolCalls);
    assert.ok(relayStream.end?.verified && relayStream.end.chunksVerified);
  });

  test('WHOLE mode: a reset upstream inside the arguments still ends with exactly one valid call', async () => {
    // Three text events, the call's first event, then its argument
    // fragments: reset@6 breaks the upstream inside the arguments.
    const result = await clientOf(gateway.address).generate('sim', QUESTION, {
      tools: [WEATHER],
      metadata: { 'sim.faults': 'reset@6,ok' },
    });
    assertOneValidCall(result);
    assertFullyVerified(result);
    assert.ok(result.notices.some((notice) => notice.error.code === 'ECONNRESET'));
    assert.ok(!result.end.partial);
  });

  test('STREAM mode: the same reset ends partial with TOOL_CALL_INTERRUPTED, never continued', async () => {
    const result = await clientOf(gateway.address).generate('sim', QUESTION, {
      tools: [WEATHER],
      metadata: { 'sim.faults': 'reset@6,ok' },
      policy: { toolCalls: 'stream' },
    });
    assert.ok(result.end.partial);
    assert.equal(result.end.error?.code, 'TOOL_CALL_INTERRUPTED');
    assertFullyVerified(result);
    // What arrived of the call is there, and is not a whole JSON object.
    assert.equal(result.toolCalls.length, 1);
    assert.throws(() => JSON.parse(result.toolCalls[0]?.arguments ?? ''));
  });

  test('STREAM mode refusing partials: a GenerationFailed whose chunks digest is checked', async () => {
    const error = await rejection(
      clientOf(gateway.address).generate('sim', QUESTION, {
        tools: [WEATHER],
        metadata: { 'sim.faults': 'reset@6,ok' },
        policy: { toolCalls: 'stream', allowPartial: false },
      }),
    );
    assert.ok(error instanceof GenerationFailed, String(error));
    assert.equal(error.error.code, 'TOOL_CALL_INTERRUPTED');
    assert.match(error.delivered.chunksSha256, /^[0-9a-f]{64}$/);
    assert.equal(error.delivered.totalSeq, error.partial?.lastSeq);
    assert.equal(error.partial?.toolCalls.length, 1);
  });
});
