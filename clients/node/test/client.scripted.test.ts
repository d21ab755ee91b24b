/**
 * The reconnect loop and the end checks against a scripted server over a
 * real port: what a real gateway never does on purpose (a seq gap, a wrong
 * digest, NOT_FOUND on a resume, a replayed notice) and tool calls and
 * reasoning while the gateway does not stream them yet. The same cases as
 * the Python client's tests/test_client.py.
 */
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { after, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import {
  DigestMismatch,
  GenerationFailed,
  ProtocolViolation,
  ReconnectsExhausted,
  RelayClient,
  type RelayEvent,
  ResumeRejected,
  StreamFailed,
  assistantMessage,
  backoffDelay,
  textSha256,
  toolResult,
} from '../src/index';
import { contractType } from '../src/wire';
import { PROMPT, chunksOf, collect, range, rejection, seededRandom } from './support/kit';
import {
  AWAIT_REQUEST,
  HANG,
  ScriptedRelay,
  type Step,
  chunk,
  endFor,
  notice,
  recordingSleep,
  started,
  textUpTo,
  unavailable,
} from './support/scriptedRelay';
import { bytesField, richStatus } from './support/rpcStatus';

const servers: ScriptedRelay[] = [];
const clients: RelayClient[] = [];

after(async () => {
  for (const client of clients) {
    client.close();
  }
  for (const server of servers) {
    await server.stop();
  }
});

async function serve(scripts: readonly (readonly Step[])[]): Promise<[ScriptedRelay, string]> {
  const server = new ScriptedRelay(scripts);
  servers.push(server);
  return [server, await server.start()];
}

function scriptedClient(
  address: string,
  sleep: (ms: number) => Promise<void>,
  maxAttempts = 3,
): RelayClient {
  const client = new RelayClient(address, {
    reconnect: { sleep, random: seededRandom(7), maxAttempts, connectTimeoutMs: 5000 },
  });
  clients.push(client);
  return client;
}

function plainClient(address: string): RelayClient {
  const client = new RelayClient(address);
  clients.push(client);
  return client;
}

describe('requests', () => {
  test('messages may be pairs or objects, and unset params are not sent', async () => {
    const [server, address] = await serve([[started(), endFor('', 0)]]);
    await plainClient(address).generate(
      'sim',
      [
        ['system', 'be brief'],
        { role: 'user', content: 'hi' },
      ],
      { maxTokens: 5 },
    );
    const start = server.firstRequests[0]?.start;
    assert.deepEqual(
      start?.messages.map((message) => [message.role, message.content]),
      [
        ['system', 'be brief'],
        ['user', 'hi'],
      ],
    );
    assert.equal(start?.params?.maxTokens, 5);
    assert.equal(start?.params?.temperature, undefined);
  });

  test('tools, tool choice, the tool-call mode and an agent turn go on the wire', async () => {
    const [server, address] = await serve([[started(), endFor('', 0)]]);
    const turn = { text: 'checking', toolCalls: [{ id: 'call_1', name: 'weather', arguments: '{"city":"Oslo"}' }] };
    await plainClient(address).generate(
      'sim',
      [['user', 'weather in Oslo?'], assistantMessage(turn), toolResult('call_1', '{"temp_c":7}')],
      {
        tools: [
          {
            name: 'weather',
            description: 'current weather',
            parameters: { type: 'object', properties: { city: { type: 'string' } } },
          },
        ],
        toolChoice: { tool: 'weather' },
        policy: { toolCalls: 'stream' },
      },
    );
    const start = server.firstRequests[0]?.start;
    assert.deepEqual(start?.tools, [
      {
        name: 'weather',
        description: 'current weather',
        parametersJson: '{"type":"object","properties":{"city":{"type":"string"}}}',
      },
    ]);
    assert.equal(start?.toolChoice?.toolName, 'weather');
    assert.equal(start?.policy?.toolCalls, 'TOOL_CALL_MODE_STREAM');
    const [, assistant, tool] = start?.messages ?? [];
    assert.deepEqual(assistant?.toolCalls, [
      { id: 'call_1', name: 'weather', argumentsJson: '{"city":"Oslo"}' },
    ]);
    assert.equal(assistant?.content, 'checking');
    assert.deepEqual([tool?.role, tool?.toolCallId, tool?.content], ['tool', 'call_1', '{"temp_c":7}']);
  });

  test('the client default policy is sent, and a call overrides it field by field', async () => {
    const [server, address] = await serve([[started(), endFor('', 0)]]);
    const client = new RelayClient(address, { policy: { maxRetries: 1, allowPartial: false } });
    clients.push(client);
    await client.generate('sim', PROMPT, { policy: { maxRetries: 4 } });
    const policy = server.firstRequests[0]?.start?.policy;
    assert.equal(policy?.maxRetries, 4);
    assert.equal(policy?.allowPartial, false);
  });

  const refusals: [string, () => unknown, RegExp][] = [
    ['a message that is neither a pair nor an object names its index', () => plainClient('127.0.0.1:1').stream('sim', ['hello' as never]), /messages\[0\]/],
    ['a pair of three names its length', () => plainClient('127.0.0.1:1').stream('sim', [['user', 'a', 'b'] as never]), /messages\[0\] must be \[role, content\], got 3/],
    ['an unknown policy field is named', () => plainClient('127.0.0.1:1').stream('sim', PROMPT, { policy: { maxRetrys: 2 } as never }), /maxRetrys/],
    ['an unknown tool choice is named', () => plainClient('127.0.0.1:1').stream('sim', PROMPT, { toolChoice: 'always' as never }), /toolChoice/],
    ['tool parameters that are not an object are named', () => plainClient('127.0.0.1:1').stream('sim', PROMPT, { tools: [{ name: 'f', parameters: 3 as never }] }), /tools\[0\]\.parameters/],
    ['tool-call arguments that are not text are named', () => plainClient('127.0.0.1:1').stream('sim', [{ role: 'assistant', toolCalls: [{ id: 'a', name: 'f', arguments: {} as never }] }]), /messages\[0\]\.toolCalls\[0\]\.arguments/],
    ['a bad default policy is refused by the constructor', () => new RelayClient('127.0.0.1:1', { policy: { toolCalls: 'partly' as never } }), /policy\.toolCalls/],
  ];
  for (const [id, build, message] of refusals) {
    test(id, () => {
      assert.throws(build, { name: 'TypeError', message });
    });
  }
});

describe('client options', () => {
  const refusals: [string, () => unknown, string, RegExp][] = [
    ['an empty address is refused', () => new RelayClient(''), 'TypeError', /address/],
    ['a negative reconnect budget is refused', () => new RelayClient('a:1', { reconnect: { maxAttempts: -1 } }), 'RangeError', /reconnect\.maxAttempts/],
    ['jitter above 1 is refused', () => new RelayClient('a:1', { reconnect: { jitter: 2 } }), 'RangeError', /reconnect\.jitter/],
    ['a zero connect timeout is refused', () => new RelayClient('a:1', { reconnect: { connectTimeoutMs: 0 } }), 'RangeError', /reconnect\.connectTimeoutMs/],
    ['a zero keepalive time is refused', () => new RelayClient('a:1', { keepalive: { timeMs: 0 } }), 'RangeError', /keepalive\.timeMs/],
    ['a resume without a token is refused', () => plainClient('a:1').resume('', 0), 'TypeError', /resume token/],
    ['a resume from a negative seq is refused', () => plainClient('a:1').resume('tok', -1), 'RangeError', /lastSeq/],
  ];
  for (const [id, build, name, message] of refusals) {
    test(id, () => {
      assert.throws(build, { name, message });
    });
  }

  test('a client with keepalive settings streams, and a reconnect budget of 0 never reconnects', async () => {
    const [server, address] = await serve([[started(), chunk(1), unavailable()]]);
    const { sleep, delays } = recordingSleep();
    const client = new RelayClient(address, {
      keepalive: { timeMs: 10_000, timeoutMs: 5000, permitWithoutCalls: true },
      reconnect: { maxAttempts: 0, sleep },
    });
    clients.push(client);
    const error = await rejection(collect(client.stream('sim', PROMPT)));
    assert.ok(error instanceof ReconnectsExhausted && error.attempts === 0);
    assert.equal(server.firstRequests.length, 1);
    assert.deepEqual(delays, []);
  });
});

describe('reconnecting', () => {
  test('a start retried before started reuses the idempotency key', async () => {
    const [server, address] = await serve([
      [unavailable()],
      [started(true), chunk(1), endFor(textUpTo(1), 1)],
    ]);
    const { sleep, delays } = recordingSleep();
    const events = await collect(scriptedClient(address, sleep).stream('sim', PROMPT));
    const [first, second] = server.firstRequests;
    assert.ok(first?.start?.idempotencyKey);
    assert.equal(second?.start?.idempotencyKey, first?.start?.idempotencyKey);
    assert.deepEqual(chunksOf(events).map((c) => c.seq), [1]);
    assert.equal(delays.length, 1);
  });

  test('a given idempotency key is sent as is', async () => {
    const [server, address] = await serve([[started(), endFor('', 0)]]);
    await plainClient(address).generate('sim', PROMPT, { idempotencyKey: 'order-42' });
    assert.equal(server.firstRequests[0]?.start?.idempotencyKey, 'order-42');
  });

  test('a resume after UNAVAILABLE uses the latest token and drops replayed chunks', async () => {
    const checkpoint = { checkpoint: { seq: 2, tokenCount: 2, resumeToken: 'cp2' } };
    const [server, address] = await serve([
      [started(), chunk(1), chunk(2), checkpoint, chunk(3), unavailable()],
      // A sloppy server that replays 2 and 3: the client must drop them.
      [started(true), chunk(2), chunk(3), chunk(4), endFor(textUpTo(4), 4)],
    ]);
    const relayStream = scriptedClient(address, recordingSleep().sleep).stream('sim', PROMPT);
    const events = await collect(relayStream);
    const resume = server.firstRequests[1]?.resume;
    assert.deepEqual([resume?.resumeToken, resume?.lastSeq], ['cp2', 3]);
    assert.deepEqual(chunksOf(events).map((c) => c.seq), [1, 2, 3, 4]);
    assert.equal(relayStream.duplicatesDropped, 2);
    assert.equal(relayStream.text, textUpTo(4));
    const reconnected = events.filter((event) => event.type === 'reconnected');
    assert.equal(reconnected.length, 1);
    assert.deepEqual(
      reconnected.map((event) => event.type === 'reconnected' && [event.lastSeq, event.attempt]),
      [[3, 1]],
    );
    assert.match(reconnected[0]?.type === 'reconnected' ? reconnected[0].cause : '', /UNAVAILABLE/);
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.verified);
  });

  test('reconnect events come in order around the resume', async () => {
    const [, address] = await serve([
      [started(), chunk(1), unavailable()],
      [started(true), chunk(2), endFor(textUpTo(2), 2)],
    ]);
    const events = await collect(scriptedClient(address, recordingSleep().sleep).stream('sim', PROMPT));
    assert.deepEqual(
      events.map((event) => event.type),
      ['started', 'chunk', 'reconnecting', 'reconnected', 'started', 'chunk', 'end'],
    );
  });

  test('a notice replayed after a resume is delivered once', async () => {
    const [, address] = await serve([
      [started(), chunk(1), notice('HTTP_429'), unavailable()],
      [started(true), notice('HTTP_429'), chunk(2), endFor(textUpTo(2), 2)],
    ]);
    const events = await collect(scriptedClient(address, recordingSleep().sleep).stream('sim', PROMPT));
    assert.deepEqual(
      events.flatMap((event) => (event.type === 'notice' ? [event.error.code] : [])),
      ['HTTP_429'],
    );
  });

  test('reconnects are exhausted after the budget, with the partial answer', async () => {
    const [server, address] = await serve([[started(), chunk(1), chunk(2), unavailable()], [unavailable()]]);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(collect(scriptedClient(address, sleep, 3).stream('sim', PROMPT)));
    assert.ok(error instanceof ReconnectsExhausted);
    assert.equal(error.attempts, 3);
    assert.deepEqual([error.partial?.lastSeq, error.partial?.text], [2, textUpTo(2)]);
    assert.equal(error.partial?.resumeToken, 'token-false');
    assert.equal(server.firstRequests.length, 4, 'the call, then three reconnects');
    const random = seededRandom(7);
    assert.deepEqual(
      delays,
      [1, 2, 3].map((attempt) => backoffDelay(attempt, { baseMs: 1000, capMs: 30_000, jitter: 0.1 }, random)),
    );
  });

  test('progress resets the reconnect budget', async () => {
    // Every call delivers one new chunk and then breaks: with a budget of one
    // reconnect the stream still completes, because each chunk is progress.
    const scripts: Step[][] = [[started(), chunk(1), unavailable()]];
    for (const seq of range(2, 5)) {
      scripts.push([started(true), chunk(seq), unavailable()]);
    }
    scripts.push([started(true), chunk(6), endFor(textUpTo(6), 6)]);
    const [, address] = await serve(scripts);
    const { sleep, delays } = recordingSleep();
    const relayStream = scriptedClient(address, sleep, 1).stream('sim', PROMPT);
    const events = await collect(relayStream);
    assert.deepEqual(chunksOf(events).map((c) => c.seq), range(1, 6));
    assert.equal(relayStream.reconnects, 5);
    // Each round is a fresh first attempt, so every delay is the base delay.
    assert.ok(delays.every((delay) => delay >= 900 && delay <= 1100), String(delays));
  });

  test('attaching without a new chunk is not progress', async () => {
    const [server, address] = await serve([
      [started(), chunk(1), unavailable()],
      [started(true), unavailable()],
    ]);
    const error = await rejection(collect(scriptedClient(address, recordingSleep().sleep, 2).stream('sim', PROMPT)));
    assert.ok(error instanceof ReconnectsExhausted);
    assert.equal(server.firstRequests.length, 3);
  });

  test('a gateway that connects but never starts is reported as such', async () => {
    const [, address] = await serve([[HANG]]);
    const client = new RelayClient(address, {
      reconnect: { sleep: recordingSleep().sleep, maxAttempts: 1, connectTimeoutMs: 200 },
    });
    clients.push(client);
    const error = await rejection(collect(client.stream('sim', PROMPT)));
    assert.ok(error instanceof ReconnectsExhausted);
    assert.match(error.cause, /no StreamStarted within 0.2 s/);
  });
});

describe('terminal statuses', () => {
  test('INVALID_ARGUMENT is not retried', async () => {
    const [server, address] = await serve([
      [{ status: grpc.status.INVALID_ARGUMENT, details: 'start.model: unknown model' }],
    ]);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(collect(scriptedClient(address, sleep).stream('nope', PROMPT)));
    assert.ok(error instanceof StreamFailed && !(error instanceof ResumeRejected));
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.match(error.details, /start\.model/);
    assert.equal(server.firstRequests.length, 1);
    assert.deepEqual(delays, []);
  });

  test('a real server error is not retried and keeps the partial answer', async () => {
    const [, address] = await serve([[started(), chunk(1), { status: grpc.status.INTERNAL, details: 'incident 42' }]]);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(collect(scriptedClient(address, sleep).stream('sim', PROMPT)));
    assert.ok(error instanceof StreamFailed);
    assert.equal(error.partial?.text, textUpTo(1));
    assert.deepEqual(delays, []);
  });

  test('NOT_FOUND on a resume is a ResumeRejected', async () => {
    const [, address] = await serve([
      [started(), chunk(1), unavailable()],
      [{ status: grpc.status.NOT_FOUND, details: 'stream expired' }],
    ]);
    const error = await rejection(collect(scriptedClient(address, recordingSleep().sleep).stream('sim', PROMPT)));
    assert.ok(error instanceof ResumeRejected);
    assert.equal(error.code, grpc.status.NOT_FOUND);
    assert.equal(error.partial?.lastSeq, 1);
  });

  test('an UNAVAILABLE whose details carry a StreamError is a GenerationFailed, never resumed', async () => {
    const streamError = contractType('tokenrelay.v1.StreamError');
    const errorBytes = streamError
      .encode(streamError.fromObject({ type: 1, code: 'ECONNRESET', message: 'reset', retryable: true, fatal: true }))
      .finish();
    const metadata = new grpc.Metadata();
    metadata.set('grpc-status-details-bin', richStatus(14, 'ECONNRESET: reset', [
      ['type.googleapis.com/tokenrelay.v1.StreamError', Buffer.from(errorBytes)],
      ['type.googleapis.com/google.rpc.ErrorInfo', errorInfo({ total_seq: '1', text_sha256: textSha256(textUpTo(1)) })],
    ]));
    const [server, address] = await serve([
      [started(), chunk(1), { status: grpc.status.UNAVAILABLE, details: 'ECONNRESET: reset', metadata }],
    ]);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(collect(scriptedClient(address, sleep).stream('sim', PROMPT)));
    assert.ok(error instanceof GenerationFailed);
    assert.equal(error.code, grpc.status.UNAVAILABLE);
    assert.deepEqual([error.error.code, error.error.type, error.error.retryable], ['ECONNRESET', 'network', true]);
    assert.deepEqual(error.delivered, { totalSeq: 1, textSha256: textSha256(textUpTo(1)), chunksSha256: '' });
    assert.equal(error.partial?.text, textUpTo(1));
    assert.equal(server.firstRequests.length, 1);
    assert.deepEqual(delays, []);
  });
});

describe('the end checks', () => {
  test('a wrong text digest at the end is a DigestMismatch with the partial answer', async () => {
    const [, address] = await serve([[started(), chunk(1), chunk(2), endFor('t1 t2', 2)]]);
    const error = await rejection(collect(plainClient(address).stream('sim', PROMPT)));
    assert.ok(error instanceof DigestMismatch);
    assert.equal(error.which, 'text');
    assert.equal(error.partial?.text, textUpTo(2));
  });

  test('a seq gap is a ProtocolViolation', async () => {
    const [, address] = await serve([[started(), chunk(1), chunk(3), endFor(textUpTo(3), 3)]]);
    const error = await rejection(collect(plainClient(address).stream('sim', PROMPT)));
    assert.ok(error instanceof ProtocolViolation);
    assert.match(error.message, /1 chunk/);
  });

  test('a first event that is not started is a ProtocolViolation', async () => {
    const [, address] = await serve([[chunk(1)]]);
    const error = await rejection(collect(plainClient(address).stream('sim', PROMPT)));
    assert.ok(error instanceof ProtocolViolation);
    assert.match(error.message, /started/);
  });

  test('a resume without the earlier text cannot verify but still checks the count', async () => {
    const [server, address] = await serve([[started(true), chunk(3), endFor(textUpTo(3), 3)]]);
    const events = await collect(plainClient(address).resume('tok', 2));
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && !end.verified);
    assert.equal(server.firstRequests[0]?.resume?.lastSeq, 2);
  });

  test('a resume with the earlier text verifies the whole digest', async () => {
    const [, address] = await serve([[started(true), chunk(3), endFor(textUpTo(3), 3)]]);
    const relayStream = plainClient(address).resume('tok', 2, { textSoFar: textUpTo(2) });
    const events = await collect(relayStream);
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.verified);
    assert.equal(relayStream.text, textUpTo(3));
  });
});

// --- tool calls and reasoning: the digest written out from the contract by hand -----------

function record(tag: string, ...fields: (number | string)[]): Buffer {
  const parts = [Buffer.from(tag)];
  for (const field of fields) {
    if (typeof field === 'number') {
      const index = Buffer.alloc(4);
      index.writeUInt32BE(field);
      parts.push(index);
    } else {
      const bytes = Buffer.from(field, 'utf8');
      const size = Buffer.alloc(4);
      size.writeUInt32BE(bytes.length);
      parts.push(size, bytes);
    }
  }
  return Buffer.concat(parts);
}

function sha256(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function agentChunks(): { steps: Step[]; digest: string } {
  const steps: Step[] = [
    { chunk: { seq: 1, reasoning: 'The user wants ', provider: 'sim', attempt: 1 } },
    { chunk: { seq: 2, reasoning: 'the weather.', provider: 'sim', attempt: 1 } },
    { chunk: { seq: 3, text: 'Checking.', provider: 'sim', attempt: 1 } },
    { chunk: { seq: 4, toolCall: { index: 0, id: 'call_1', name: 'weather', arguments: '{"city":' }, provider: 'sim', attempt: 1 } },
    { chunk: { seq: 5, toolCall: { index: 0, arguments: '"Oslo"}' }, provider: 'sim', attempt: 1 } },
  ];
  const digest = sha256(
    Buffer.concat([
      record('R', 'The user wants '),
      record('R', 'the weather.'),
      record('T', 'Checking.'),
      record('C', 0, 'call_1', 'weather', '{"city":'),
      record('C', 0, '', '', '"Oslo"}'),
    ]),
  );
  return { steps, digest };
}

describe('tool calls and reasoning', () => {
  test('reasoning, text and a streamed tool call are assembled and every chunk verified', async () => {
    const { steps, digest } = agentChunks();
    const [, address] = await serve([
      [started(), ...steps, endFor('Checking.', 5, { chunks: digest, finishReason: 'tool_calls' })],
    ]);
    const result = await plainClient(address).generate('sim', PROMPT);
    assert.equal(result.reasoning, 'The user wants the weather.');
    assert.equal(result.text, 'Checking.');
    assert.deepEqual(result.toolCalls, [{ id: 'call_1', name: 'weather', arguments: '{"city":"Oslo"}' }]);
    assert.equal(result.end.finishReason, 'tool_calls');
    assert.ok(result.end.verified && result.end.chunksVerified);
  });

  test('the chunk events say which kind they are', async () => {
    const { steps, digest } = agentChunks();
    const [, address] = await serve([[started(), ...steps, endFor('Checking.', 5, { chunks: digest })]]);
    const events = await collect(plainClient(address).stream('sim', PROMPT));
    assert.deepEqual(
      chunksOf(events).map((c) => c.kind),
      ['reasoning', 'reasoning', 'text', 'toolCall', 'toolCall'],
    );
    const first = chunksOf(events)[3];
    assert.ok(first?.kind === 'toolCall');
    assert.deepEqual(first.toolCall, { index: 0, id: 'call_1', name: 'weather', arguments: '{"city":' });
  });

  test('a tool call other than the one the server hashed is a chunks DigestMismatch', async () => {
    const { steps } = agentChunks();
    const otherDigest = sha256(record('C', 0, 'call_1', 'weather', '{"city":"Bergen"}'));
    const [, address] = await serve([[started(), ...steps, endFor('Checking.', 5, { chunks: otherDigest })]]);
    const error = await rejection(collect(plainClient(address).stream('sim', PROMPT)));
    assert.ok(error instanceof DigestMismatch);
    assert.equal(error.which, 'chunks');
    assert.deepEqual(error.partial?.toolCalls, [{ id: 'call_1', name: 'weather', arguments: '{"city":"Oslo"}' }]);
  });

  test('tool calls resumed after a break are assembled once, and the digest still covers all', async () => {
    const { steps, digest } = agentChunks();
    const [server, address] = await serve([
      [started(), ...steps.slice(0, 4), unavailable()],
      // The resume replays seq 4 (dropped) and goes on.
      [started(true), steps[3] as Step, steps[4] as Step, endFor('Checking.', 5, { chunks: digest })],
    ]);
    const relayStream = scriptedClient(address, recordingSleep().sleep).stream('sim', PROMPT);
    const result = await relayStream.collect();
    assert.equal(server.firstRequests[1]?.resume?.lastSeq, 4);
    assert.equal(result.duplicatesDropped, 1);
    assert.deepEqual(result.toolCalls, [{ id: 'call_1', name: 'weather', arguments: '{"city":"Oslo"}' }]);
    assert.ok(result.end.chunksVerified);
  });

  test('a resume from an error\u2019s partial keeps every digest checkable', async () => {
    const { steps, digest } = agentChunks();
    const [, first] = await serve([[started(), ...steps.slice(0, 3), unavailable()]]);
    const exhausted = await rejection(
      collect(scriptedClient(first, recordingSleep().sleep, 0).stream('sim', PROMPT)),
    );
    assert.ok(exhausted instanceof ReconnectsExhausted && exhausted.partial !== null);
    assert.equal(exhausted.partial.reasoning, 'The user wants the weather.');
    const [, second] = await serve([[started(true), steps[3] as Step, steps[4] as Step, endFor('Checking.', 5, { chunks: digest })]]);
    const result = await plainClient(second).resume(exhausted.partial).collect();
    assert.equal(result.reasoning, 'The user wants the weather.');
    assert.ok(result.end.verified && result.end.chunksVerified);
  });
});

describe('cancel', () => {
  test('cancel sends a cancel request and the stream ends cancelled', async () => {
    const [server, address] = await serve([
      [
        started(),
        chunk(1),
        AWAIT_REQUEST,
        { end: { finishReason: 'cancelled', totalSeq: 1, textSha256: textSha256('t1 ') } },
      ],
    ]);
    const relayStream = plainClient(address).stream('sim', PROMPT);
    const events: RelayEvent[] = [];
    for await (const event of relayStream) {
      events.push(event);
      if (event.type === 'chunk') {
        relayStream.cancel('enough');
      }
    }
    assert.equal(server.laterRequests[0]?.cancel?.reason, 'enough');
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.finishReason === 'cancelled');
  });
});

// --- rich status details, built the way the gateway builds them -------------------------------
// By hand from the protobuf wire format (protobuf.dev/programming-guides/encoding):
// google.rpc.Status {code = 1, message = 2, repeated Any details = 3},
// Any {type_url = 1, value = 2}, ErrorInfo {reason = 1, domain = 2, map metadata = 3}.

function errorInfo(metadata: Record<string, string>): Buffer {
  const parts = [bytesField(1, 'ECONNRESET'), bytesField(2, 'tokenrelay.v1')];
  for (const [key, value] of Object.entries(metadata)) {
    parts.push(bytesField(3, Buffer.concat([bytesField(1, key), bytesField(2, value)])));
  }
  return Buffer.concat(parts);
}
