/**
 * A Relay server that plays one scripted list of steps per call (the last
 * script repeats) and records each call's requests: the Python tests'
 * ScriptedRelay, for what a real gateway never does on purpose (a seq gap, a
 * wrong digest, a first event that is not StreamStarted, a resume refused
 * with NOT_FOUND). Over a real port, with the contract loaded as the client
 * loads it.
 */
import * as grpc from '@grpc/grpc-js';

import { textSha256 } from '../../src/assembly';
import type { StreamEvent } from '../../src/generated/tokenrelay/v1/StreamEvent';
import type { StreamRequest__Output } from '../../src/generated/tokenrelay/v1/StreamRequest';
import { relayServiceDefinition } from '../../src/wire';

export interface StatusStep {
  readonly status: grpc.status;
  readonly details: string;
  readonly metadata?: grpc.Metadata;
}

/** Keep the call open and say nothing more. */
export const HANG = { hang: true } as const;

/** Wait for the client's next request (after the first) before going on. */
export const AWAIT_REQUEST = { awaitRequest: true } as const;

export type Step = StreamEvent | StatusStep | typeof HANG | typeof AWAIT_REQUEST;

export class ScriptedRelay {
  readonly firstRequests: StreamRequest__Output[] = [];
  readonly laterRequests: StreamRequest__Output[] = [];
  /** Each call's metadata (text values), in call order. */
  readonly callMetadata: Record<string, string>[] = [];
  private readonly server = new grpc.Server();
  private readonly open = new Set<grpc.ServerDuplexStream<StreamRequest__Output, StreamEvent>>();

  constructor(private readonly scripts: readonly (readonly Step[])[]) {
    this.server.addService(relayServiceDefinition(), {
      Stream: (call: grpc.ServerDuplexStream<StreamRequest__Output, StreamEvent>) => this.play(call),
    });
  }

  /** Listen on a free port; returns "127.0.0.1:port". */
  async start(): Promise<string> {
    const port = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    return `127.0.0.1:${port}`;
  }

  async stop(): Promise<void> {
    for (const call of this.open) {
      call.destroy();
    }
    this.server.forceShutdown();
  }

  private play(call: grpc.ServerDuplexStream<StreamRequest__Output, StreamEvent>): void {
    const script = this.scripts[Math.min(this.firstRequests.length, this.scripts.length - 1)] ?? [];
    this.open.add(call);
    this.callMetadata.push(
      Object.fromEntries(
        Object.entries(call.metadata.getMap()).map(([key, value]) => [key, String(value)]),
      ),
    );
    const waiting: StreamRequest__Output[] = [];
    let wake: (() => void) | null = null;
    let closed = false;
    const notify = (): void => {
      const waker = wake;
      wake = null;
      waker?.();
    };
    call.once('close', () => {
      this.open.delete(call);
      closed = true;
      notify();
    });
    call.on('cancelled', () => {
      closed = true;
      notify();
    });
    call.on('error', () => undefined); // a client that cancels is not a failure here
    call.on('end', () => {
      closed = true;
      notify();
    });
    let first = true;
    call.on('data', (request: StreamRequest__Output) => {
      if (first) {
        first = false;
        this.firstRequests.push(request);
      } else {
        this.laterRequests.push(request);
      }
      waiting.push(request);
      notify();
    });
    const nextRequest = async (): Promise<StreamRequest__Output | null> => {
      while (waiting.length === 0 && !closed) {
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
      }
      return waiting.shift() ?? null;
    };
    void (async () => {
      if ((await nextRequest()) === null) {
        return;
      }
      for (const step of script) {
        if ('hang' in step) {
          return;
        }
        if ('awaitRequest' in step) {
          if ((await nextRequest()) === null) {
            return;
          }
          continue;
        }
        if ('status' in step) {
          call.emit('error', { code: step.status, details: step.details, metadata: step.metadata });
          return;
        }
        call.write(step);
      }
      call.end();
    })();
  }
}

// --- script steps --------------------------------------------------------------------

export function started(resumed = false): StreamEvent {
  return {
    started: { streamId: 's1', resumeToken: `token-${resumed}`, resumed, model: 'sim' },
  };
}

export function chunk(seq: number): StreamEvent {
  return { chunk: { seq, text: `t${seq} `, provider: 'sim', attempt: 1 } };
}

export function textUpTo(last: number): string {
  let text = '';
  for (let seq = 1; seq <= last; seq += 1) {
    text += `t${seq} `;
  }
  return text;
}

export function endFor(
  text: string,
  totalSeq: number,
  digests: { text?: string; chunks?: string; finishReason?: string } = {},
): StreamEvent {
  return {
    end: {
      finishReason: digests.finishReason ?? 'stop',
      totalSeq,
      textSha256: digests.text ?? textSha256(text),
      chunksSha256: digests.chunks ?? '',
    },
  };
}

export function notice(code: string): StreamEvent {
  return { error: { code, message: 'retrying upstream', retryable: true, fatal: false } };
}

export function unavailable(details = 'draining'): StatusStep {
  return { status: grpc.status.UNAVAILABLE, details };
}

/** A sleep that records each delay and returns at once. */
export function recordingSleep(): { sleep: (ms: number) => Promise<void>; delays: number[] } {
  const delays: number[] = [];
  return {
    delays,
    sleep: async (ms: number) => {
      delays.push(ms);
    },
  };
}
