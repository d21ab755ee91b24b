/**
 * The Node client honours a refused start's advice, as the Python client
 * does (tests/test_client_start_retry.py): a start refused with
 * RESOURCE_EXHAUSTED that says when to try again (google.rpc.RetryInfo,
 * `retry-after-ms`) is sent again after that wait, a bounded number of
 * times, then thrown as `StreamFailed` carrying the wait.
 *
 * The decision is a pure function (table); the loop runs against a real
 * gateway that sheds (max_streams = 1, one paced stream holding the slot) or
 * counts a tenant's quota. The client's sleep is a recording fake, so no test
 * waits the advised seconds; a slot is freed by cancelling the stream that
 * holds it and polling the gateway's /metrics until no generation is left.
 */
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { setTimeout as pause } from 'node:timers/promises';
import { after, afterEach, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import {
  RelayClient,
  type RelayClientOptions,
  type RelayEvent,
  RelayStream,
  StreamFailed,
  type Throttled,
  startRetryWait,
} from '../src/index';
import { RETRY_AFTER_MS, advisedWaitMs } from '../src/wire';
import { type Gateway, startGateway } from './support/gateway';
import { rejection } from './support/kit';
import { errorInfo, retryInfo, trailers } from './support/rpcStatus';
import { ScriptedRelay, chunk, endFor, started, textUpTo } from './support/scriptedRelay';

const PROMPT: [string, string][] = [['user', 'wait your turn']];
const EXHAUSTED = grpc.status.RESOURCE_EXHAUSTED;
const ACME_KEY = 'trk_acme_' + 'a1'.repeat(20);

// --- the decision (pure) -----------------------------------------------------------------

describe('startRetryWait', () => {
  const rows: [string, grpc.status, number | null, number, number | null][] = [
    // [id, code, advised ms, retries done, expected]
    ['a shed start waits the advised time', EXHAUSTED, 2500, 0, 2500],
    ['the third retry still waits it', EXHAUSTED, 2500, 2, 2500],
    ['after the budget the refusal is thrown', EXHAUSTED, 2500, 3, null],
    ['a refusal without advice is thrown', EXHAUSTED, null, 0, null],
    ['a wait past the cap is thrown, not slept', EXHAUSTED, 61_000, 0, null],
    ['a wait at the cap is slept', EXHAUSTED, 60_000, 0, 60_000],
    ['a negative advice waits nothing', EXHAUSTED, -1000, 0, 0],
    ['only RESOURCE_EXHAUSTED retries', grpc.status.PERMISSION_DENIED, 2500, 0, null],
    ["UNAVAILABLE is a reconnect's", grpc.status.UNAVAILABLE, 2500, 0, null],
  ];
  for (const [id, code, advice, done, expected] of rows) {
    test(id, () => {
      const wait = startRetryWait(code, advice, { retriesDone: done, maxRetries: 3, maxWaitMs: 60_000 });
      assert.equal(wait, expected);
    });
  }

  test('no start retries means the first refusal is thrown', () => {
    assert.equal(startRetryWait(EXHAUSTED, 1000, { retriesDone: 0, maxRetries: 0, maxWaitMs: 60_000 }), null);
  });
});

describe('advisedWaitMs', () => {
  const rows: [string, grpc.Metadata | undefined, number | null][] = [
    ['RetryInfo in the details', trailers([errorInfo('MAX_STREAMS'), retryInfo(2500)]), 2500],
    ['a RetryInfo of whole seconds', trailers([retryInfo(3000)]), 3000],
    ['retry-after-ms alone', trailers(null, { [RETRY_AFTER_MS]: '1500' }), 1500],
    ['RetryInfo wins over retry-after-ms', trailers([retryInfo(2500)], { [RETRY_AFTER_MS]: '9000' }), 2500],
    ['an unreadable header is none', trailers(null, { [RETRY_AFTER_MS]: 'soon' }), null],
    ['a negative header is none', trailers(null, { [RETRY_AFTER_MS]: '-5' }), null],
    ['details without RetryInfo', trailers([errorInfo('MAX_STREAMS')]), null],
    ['no advice at all', new grpc.Metadata(), null],
    ['no metadata at all', undefined, null],
  ];
  for (const [id, metadata, expected] of rows) {
    test(id, () => {
      assert.equal(advisedWaitMs(metadata), expected);
    });
  }

  test('unreadable status details fall back to retry-after-ms', () => {
    const metadata = trailers(null, { [RETRY_AFTER_MS]: '700' });
    metadata.set('grpc-status-details-bin', Buffer.from([0xff, 0xff, 0xff]));
    assert.equal(advisedWaitMs(metadata), 700);
  });
});

describe('the start retry options', () => {
  test('a negative or fractional budget is refused, naming the option', () => {
    assert.throws(() => new RelayClient('127.0.0.1:1', { startRetries: -1 }), /startRetries/);
    assert.throws(() => new RelayClient('127.0.0.1:1', { startRetries: 1.5 }), /startRetries/);
    assert.throws(() => new RelayClient('127.0.0.1:1', { maxStartRetryWaitMs: -1 }), /maxStartRetryWaitMs/);
  });

  test('the defaults are the Python client\'s', () => {
    const client = new RelayClient('127.0.0.1:1');
    assert.deepEqual([client.startRetries, client.maxStartRetryWaitMs], [3, 60_000]);
  });
});

// --- retry-after-ms alone: a server that sends no RetryInfo (the gateway always does) -------

describe('a refusal that advises by retry-after-ms only', () => {
  test('is retried after it, with the same start and idempotency key', async () => {
    const refusal = { status: EXHAUSTED, details: 'busy', metadata: trailers(null, { [RETRY_AFTER_MS]: '1500' }) };
    const server = new ScriptedRelay([[refusal], [started(), chunk(1), endFor(textUpTo(1), 1)]]);
    const address = await server.start();
    const { sleep, delays } = recordingSleep();
    const client = new RelayClient(address, { reconnect: { sleep } });
    try {
      const events: RelayEvent[] = [];
      await collect(client.stream('sim', PROMPT, { idempotencyKey: 'key-1' }), events);
      assert.deepEqual(delays, [1500]);
      assert.deepEqual(events.map((e) => e.type), ['throttled', 'started', 'chunk', 'end']);
      assert.deepEqual(
        server.firstRequests.map((request) => [request.kind, request.start?.idempotencyKey]),
        [
          ['start', 'key-1'],
          ['start', 'key-1'],
        ],
      );
    } finally {
      client.close();
      await server.stop();
    }
  });

  test('a refusal without any advice is thrown at once, retryAfterMs null', async () => {
    const server = new ScriptedRelay([[{ status: EXHAUSTED, details: 'request too large' }]]);
    const address = await server.start();
    const { sleep, delays } = recordingSleep();
    const client = new RelayClient(address, { reconnect: { sleep } });
    try {
      const error = await rejection(client.generate('sim', PROMPT));
      assert.ok(error instanceof StreamFailed, String(error));
      assert.deepEqual([error.code, error.retryAfterMs], [EXHAUSTED, null]);
      assert.deepEqual(delays, []);
      assert.equal(server.firstRequests.length, 1);
    } finally {
      client.close();
      await server.stop();
    }
  });
});

// --- a transient failure that advises a wait ----------------------------------------------

describe('an UNAVAILABLE that advises a wait (a replica with no room for a takeover)', () => {
  test('is reconnected after the advice when it is longer than the backoff', async () => {
    const unavailable = {
      status: grpc.status.UNAVAILABLE,
      details: 'this replica is generating 1 streams (running and detached), its limit (max_streams)',
      metadata: trailers([errorInfo('MAX_STREAMS'), retryInfo(2500)]),
    };
    const server = new ScriptedRelay([[unavailable], [started(), chunk(1), endFor(textUpTo(1), 1)]]);
    const address = await server.start();
    const { sleep, delays } = recordingSleep();
    const client = new RelayClient(address, { reconnect: { sleep, baseMs: 100, jitter: 0 } });
    try {
      const events: RelayEvent[] = [];
      await collect(client.stream('sim', PROMPT, { idempotencyKey: 'key-2' }), events);
      assert.deepEqual(delays, [2500]);
      const reconnecting = events.filter((e) => e.type === 'reconnecting');
      assert.deepEqual(
        reconnecting.map((e) => e.delayMs),
        [2500],
      );
      assert.equal(events.at(-1)?.type, 'end');
    } finally {
      client.close();
      await server.stop();
    }
  });
});

// --- over a real gateway that sheds ---------------------------------------------------------

/** Stands in for the timer: records each wait, runs `during` (the world
 * moving on while the client waits), waits for nothing. */
function recordingSleep(during?: (wait: number) => Promise<void>): {
  sleep: (ms: number) => Promise<void>;
  delays: number[];
} {
  const delays: number[] = [];
  return {
    delays,
    sleep: async (ms: number) => {
      delays.push(ms);
      if (during !== undefined) {
        await during(delays.length);
      }
    },
  };
}

/** Poll real state (not a duration): `check` every 20 ms until it holds; the
 * bound is a failsafe only. */
async function eventually(check: () => Promise<boolean>, what: string): Promise<void> {
  const failsafe = Date.now() + 20_000;
  while (!(await check())) {
    if (Date.now() > failsafe) {
      assert.fail(`never: ${what}`);
    }
    await pause(20);
  }
}

interface SheddingGateway {
  readonly gateway: Gateway;
  /** Generations the gateway holds (running and detached), from /metrics. */
  generations(): Promise<number>;
  stop(): Promise<void>;
}

async function sheddingGateway(config: string): Promise<SheddingGateway> {
  const dir = mkdtempSync(path.join(tmpdir(), 'tokenrelay-shed-'));
  const file = path.join(dir, 'tokenrelay.toml');
  writeFileSync(file, config);
  // info: the gateway logs where its metrics are.
  const gateway = await startGateway(['--config', file, '--metrics-port', '0', '--log-level', 'info']);
  let url = '';
  await eventually(async () => {
    url = /metrics at (\S+)/.exec(gateway.log())?.[1] ?? '';
    return url !== '';
  }, 'the gateway logs its metrics address');
  return {
    gateway,
    async generations() {
      const text = await (await fetch(url)).text();
      let total = 0;
      for (const match of text.matchAll(/^tokenrelay_generations\{[^}]*\} (\S+)$/gm)) {
        total += Number(match[1]);
      }
      return total;
    },
    async stop() {
      await gateway.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// Loop-lag shedding is off: on a busy machine it would refuse the holder too.
const FULL_CONFIG = `
[server]
max_streams = 1
shed_retry_after_s = 2.5
max_loop_lag_ms = 0
`;

const QUOTA_CONFIG = `
[server]
max_loop_lag_ms = 0

[[auth.keys]]
id = "acme-1"
tenant = "acme"
sha256 = "${createHash('sha256').update(ACME_KEY).digest('hex')}"

[tenants.acme]
max_concurrent_streams = 1
`;

interface Holder {
  /** Cancel the held stream and wait until the gateway holds no generation. */
  free(): Promise<void>;
}

/** A paced stream (a token a second) that holds the only slot until freed. */
async function holdingTheSlot(shed: SheddingGateway, options: RelayClientOptions = {}): Promise<Holder> {
  const client = new RelayClient(shed.gateway.address, { ...options, startRetries: 0 });
  const held = client.stream('sim', PROMPT, { maxTokens: 50, metadata: { 'sim.pace_ms': '1000' } });
  const events = held[Symbol.asyncIterator]();
  const first = await events.next();
  assert.ok(!first.done && first.value.type === 'started', 'the holder started');
  let freed = false;
  return {
    async free() {
      if (freed) {
        return;
      }
      freed = true;
      held.cancel('make room');
      while (!(await events.next()).done) {
        // the chunks paced so far, then the end (cancelled)
      }
      client.close();
      await eventually(async () => (await shed.generations()) === 0, 'the slot is free');
    },
  };
}

async function collect(stream: RelayStream, into: RelayEvent[]): Promise<void> {
  for await (const event of stream) {
    into.push(event);
  }
}

function throttledOf(events: readonly RelayEvent[]): Throttled[] {
  return events.filter((event): event is Throttled => event.type === 'throttled');
}

describe('over a gateway at max_streams', () => {
  let shed: SheddingGateway;
  let holder: Holder | null = null;
  const clients: RelayClient[] = [];

  before(async () => {
    shed = await sheddingGateway(FULL_CONFIG);
  });

  afterEach(async () => {
    for (const client of clients.splice(0)) {
      client.close();
    }
    await holder?.free();
    holder = null;
  });

  after(async () => {
    await shed.stop();
  });

  function clientOf(options: RelayClientOptions): RelayClient {
    const client = new RelayClient(shed.gateway.address, options);
    clients.push(client);
    return client;
  }

  test('a start shed until the budget is spent throws with the advised wait', async () => {
    holder = await holdingTheSlot(shed);
    const { sleep, delays } = recordingSleep();
    const events: RelayEvent[] = [];
    const relayStream = clientOf({ reconnect: { sleep }, startRetries: 3 }).stream('sim', PROMPT, {
      maxTokens: 5,
    });
    const error = await rejection(collect(relayStream, events));
    assert.deepEqual(delays, [2500, 2500, 2500], 'each retry after the advised wait, three of them');
    const throttled = throttledOf(events);
    assert.deepEqual(throttled.map((e) => e.attempt), [1, 2, 3]);
    assert.equal(events.length, 3, 'nothing but the three waits');
    assert.ok(throttled.every((e) => e.delayMs === 2500 && e.maxAttempts === 3));
    assert.ok(throttled.every((e) => e.cause.startsWith('RESOURCE_EXHAUSTED: ') && e.cause.includes('max_streams')));
    assert.ok(error instanceof StreamFailed, String(error));
    assert.equal(error.code, EXHAUSTED);
    assert.equal(error.retryAfterMs, 2500);
    assert.match(error.details, /max_streams/);
    assert.equal(error.partial?.lastSeq, 0);
    assert.equal(relayStream.reconnects, 0);
    assert.equal(await shed.generations(), 1, 'the holder only: no retry was admitted');
  });

  test('a shed start is admitted once a slot frees during the wait', async () => {
    const held = await holdingTheSlot(shed);
    holder = held;
    const { sleep, delays } = recordingSleep(async (wait) => {
      if (wait === 2) {
        await held.free();
      }
    });
    const relayStream = clientOf({ reconnect: { sleep } }).stream('sim', PROMPT, { maxTokens: 5 });
    const key = relayStream.idempotencyKey;
    const events: RelayEvent[] = [];
    await collect(relayStream, events);
    assert.deepEqual(delays, [2500, 2500]);
    assert.deepEqual(events.slice(0, 3).map((e) => e.type), ['throttled', 'throttled', 'started']);
    const started = events[2];
    assert.ok(started?.type === 'started' && !started.resumed, 'one stream, started once');
    const end = events.at(-1);
    assert.ok(end?.type === 'end' && end.verified && end.totalSeq === 5 && !end.partial);
    assert.equal(relayStream.reconnects, 0, 'a refusal is not a broken connection');
    assert.equal(relayStream.idempotencyKey, key, 'the same start, the same key');
  });

  test('no start retries throws the first refusal with its advice', async () => {
    holder = await holdingTheSlot(shed);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(
      clientOf({ reconnect: { sleep }, startRetries: 0 }).generate('sim', PROMPT, { maxTokens: 5 }),
    );
    assert.deepEqual(delays, []);
    assert.ok(error instanceof StreamFailed, String(error));
    assert.deepEqual([error.code, error.retryAfterMs], [EXHAUSTED, 2500]);
  });

  test('an advised wait past the cap is thrown at once', async () => {
    holder = await holdingTheSlot(shed);
    const { sleep, delays } = recordingSleep();
    const error = await rejection(
      clientOf({ reconnect: { sleep }, maxStartRetryWaitMs: 1000 }).generate('sim', PROMPT, { maxTokens: 5 }),
    );
    assert.deepEqual(delays, []);
    assert.ok(error instanceof StreamFailed, String(error));
    assert.deepEqual([error.code, error.retryAfterMs], [EXHAUSTED, 2500]);
  });
});

describe("over a gateway counting a tenant's quota", () => {
  let shed: SheddingGateway;

  before(async () => {
    shed = await sheddingGateway(QUOTA_CONFIG);
  });

  after(async () => {
    await shed.stop();
  });

  test('a tenant over its quota is retried after the RetryInfo', async () => {
    // A quota refusal carries RetryInfo only (no retry-after-ms): 1 s for a slot.
    const held = await holdingTheSlot(shed, { apiKey: ACME_KEY });
    const { sleep, delays } = recordingSleep(() => held.free());
    const client = new RelayClient(shed.gateway.address, { apiKey: ACME_KEY, reconnect: { sleep } });
    try {
      const result = await client.generate('sim', PROMPT, { maxTokens: 5 });
      assert.deepEqual(delays, [1000]);
      assert.ok(result.chunks === 5 && !result.end.partial && result.end.verified);
    } finally {
      client.close();
      await held.free();
    }
  });
});
