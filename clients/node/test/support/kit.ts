/** Small helpers shared by the tests. */
import { strict as assert } from 'node:assert';

import type { Chunk, RelayEvent, TextChunk } from '../../src/events';

export const PROMPT: [string, string][] = [['user', 'tell me about streams']];

export async function collect(events: AsyncIterable<RelayEvent>): Promise<RelayEvent[]> {
  const seen: RelayEvent[] = [];
  for await (const event of events) {
    seen.push(event);
  }
  return seen;
}

export function chunksOf(events: readonly RelayEvent[]): Chunk[] {
  return events.filter((event): event is Chunk => event.type === 'chunk');
}

export function textOf(events: readonly RelayEvent[]): string {
  return chunksOf(events)
    .filter((chunk): chunk is TextChunk => chunk.kind === 'text')
    .map((chunk) => chunk.text)
    .join('');
}

export function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, index) => from + index);
}

/** A seeded random source in [0, 1) (mulberry32), so jittered delays can be
 * recomputed by the test. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 4294967296;
  };
}

/** What `promise` rejects with (the test fails if it resolves). */
export async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error: unknown) {
    return error;
  }
  assert.fail('expected the stream to fail');
}
