/**
 * Assembling a stream's chunks and checking them against the server's
 * digests. Pure: no grpc, no I/O.
 *
 * The contract (relay.proto, StreamEnd):
 *   text_sha256    hex SHA-256 of the UTF-8 text of the answer-text chunks in
 *                  seq order (reasoning and tool calls are not in it);
 *   chunks_sha256  hex SHA-256 of every chunk in seq order, each as a record
 *                    text:      "T" len(utf8) utf8
 *                    reasoning: "R" len(utf8) utf8
 *                    tool call: "C" index len(id) id len(name) name len(arguments) arguments
 *                  with index and every len 4-byte big-endian unsigned and
 *                  strings UTF-8.
 * Both are kept as running hashes, so a long stream costs its text, not a
 * copy of every chunk.
 */
import { createHash, type Hash } from 'node:crypto';

import { DigestMismatch, ProtocolViolation } from './errors';
import type { ToolCall, ToolCallDelta } from './events';

export type ChunkContent =
  | { readonly kind: 'text'; readonly text: string }
  | { readonly kind: 'reasoning'; readonly reasoning: string }
  | { readonly kind: 'toolCall'; readonly toolCall: ToolCallDelta };

function u32(value: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value);
  return out;
}

function sized(value: string): Buffer[] {
  const bytes = Buffer.from(value, 'utf8');
  return [u32(bytes.length), bytes];
}

/** The bytes one chunk adds to chunks_sha256 (see the module comment). */
export function chunkRecord(content: ChunkContent): Buffer {
  switch (content.kind) {
    case 'text':
      return Buffer.concat([Buffer.from('T'), ...sized(content.text)]);
    case 'reasoning':
      return Buffer.concat([Buffer.from('R'), ...sized(content.reasoning)]);
    case 'toolCall': {
      const call = content.toolCall;
      return Buffer.concat([
        Buffer.from('C'),
        u32(call.index),
        ...sized(call.id),
        ...sized(call.name),
        ...sized(call.arguments),
      ]);
    }
  }
}

/** The digest the server puts in StreamEnd.text_sha256 for this text. */
export function textSha256(text: string): string {
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

/** The digest the server puts in StreamEnd.chunks_sha256 for these chunks. */
export function chunksSha256(contents: Iterable<ChunkContent>): string {
  const hash = createHash('sha256');
  for (const content of contents) {
    hash.update(chunkRecord(content));
  }
  return hash.digest('hex');
}

interface CallBeingAssembled {
  id: string;
  name: string;
  arguments: string[];
}

/** What the end check found. */
export interface Verification {
  /** text_sha256 was checked. */
  readonly verified: boolean;
  /** chunks_sha256 was checked. */
  readonly chunksVerified: boolean;
}

/** The answer so far: text, reasoning and tool calls, the last seq, and the
 * running digests (null where the client did not see every chunk from seq 1,
 * so that digest cannot be checked). */
export class Assembly {
  lastSeq: number;
  private readonly textPieces: string[];
  private readonly reasoningPieces: string[];
  private readonly calls: Map<number, CallBeingAssembled>;
  private readonly textHash: Hash | null;
  private readonly chunksHash: Hash | null;

  private constructor(
    lastSeq: number,
    text: string,
    reasoning: string,
    calls: Map<number, CallBeingAssembled>,
    textHash: Hash | null,
    chunksHash: Hash | null,
  ) {
    this.lastSeq = lastSeq;
    this.textPieces = text ? [text] : [];
    this.reasoningPieces = reasoning ? [reasoning] : [];
    this.calls = calls;
    this.textHash = textHash;
    this.chunksHash = chunksHash;
  }

  /** A stream read from its first chunk: every digest can be checked. */
  static fresh(): Assembly {
    return new Assembly(0, '', '', new Map(), createHash('sha256'), createHash('sha256'));
  }

  /** A stream picked up after `lastSeq` knowing only the text of the chunks
   * before (or nothing: null). The text digest can be checked when the text
   * is given (or lastSeq is 0); the chunks digest only from seq 0. */
  static after(lastSeq: number, textSoFar: string | null): Assembly {
    if (lastSeq === 0) {
      return Assembly.fresh();
    }
    const textHash = textSoFar === null ? null : createHash('sha256').update(textSoFar, 'utf8');
    return new Assembly(lastSeq, textSoFar ?? '', '', new Map(), textHash, null);
  }

  copy(): Assembly {
    const calls = new Map<number, CallBeingAssembled>();
    for (const [index, call] of this.calls) {
      calls.set(index, { id: call.id, name: call.name, arguments: [call.arguments.join('')] });
    }
    return new Assembly(
      this.lastSeq,
      this.text,
      this.reasoning,
      calls,
      this.textHash?.copy() ?? null,
      this.chunksHash?.copy() ?? null,
    );
  }

  /** Whether every chunk from seq 1 is accounted for in the text digest. */
  get textVerifiable(): boolean {
    return this.textHash !== null;
  }

  get text(): string {
    return compact(this.textPieces);
  }

  get reasoning(): string {
    return compact(this.reasoningPieces);
  }

  /** The tool calls so far, by index (ids and names from their first piece,
   * arguments joined in seq order). */
  toolCalls(): ToolCall[] {
    return [...this.calls.entries()]
      .sort(([a], [b]) => a - b)
      .map(([, call]) => ({ id: call.id, name: call.name, arguments: call.arguments.join('') }));
  }

  /** Take chunk `seq`. Returns false for a duplicate (at or below the last
   * seq: replayed after a resume), true for the next one; a gap or a tool
   * call that contradicts its first piece is a ProtocolViolation. */
  accept(seq: number, content: ChunkContent): boolean {
    if (seq <= this.lastSeq) {
      return false;
    }
    if (seq !== this.lastSeq + 1) {
      throw new ProtocolViolation(
        `chunk seq ${seq} arrived after seq ${this.lastSeq}: ` +
          `${seq - this.lastSeq - 1} chunk(s) missing`,
      );
    }
    if (content.kind === 'toolCall') {
      this.addToolCallDelta(content.toolCall);
    } else if (content.kind === 'text') {
      this.textPieces.push(content.text);
      this.textHash?.update(content.text, 'utf8');
    } else {
      this.reasoningPieces.push(content.reasoning);
    }
    this.chunksHash?.update(chunkRecord(content));
    this.lastSeq = seq;
    return true;
  }

  private addToolCallDelta(delta: ToolCallDelta): void {
    const call = this.calls.get(delta.index);
    if (call === undefined) {
      this.calls.set(delta.index, {
        id: delta.id,
        name: delta.name,
        arguments: [delta.arguments],
      });
      return;
    }
    // Later pieces may repeat the id and name; they may not change them.
    for (const field of ['id', 'name'] as const) {
      const value = delta[field];
      if (value && call[field] && value !== call[field]) {
        throw new ProtocolViolation(
          `tool call ${delta.index} changed its ${field} from ` +
            `${JSON.stringify(call[field])} to ${JSON.stringify(value)}`,
        );
      }
      if (value) {
        call[field] = value;
      }
    }
    call.arguments.push(delta.arguments);
  }

  /** Check what we hold against what the server says it sent: the count
   * always, each digest that is given (not null) when we saw every chunk it
   * covers. Throws DigestMismatch. */
  verify(
    totalSeq: number,
    expectedTextSha256: string | null,
    expectedChunksSha256: string | null,
  ): Verification {
    if (totalSeq !== this.lastSeq) {
      throw new DigestMismatch(
        `the client holds chunks up to ${this.lastSeq}, the server sent 1..${totalSeq}`,
        'count',
        expectedTextSha256 ?? '',
        '',
        totalSeq,
        this.lastSeq,
      );
    }
    let verified = false;
    if (this.textHash !== null && expectedTextSha256 !== null) {
      const actual = this.textHash.copy().digest('hex');
      if (actual !== expectedTextSha256) {
        throw new DigestMismatch(
          `the text of chunks 1..${this.lastSeq} hashes to ${actual}, ` +
            `the server says ${expectedTextSha256}`,
          'text',
          expectedTextSha256,
          actual,
          totalSeq,
          this.lastSeq,
        );
      }
      verified = true;
    }
    let chunksVerified = false;
    if (this.chunksHash !== null && expectedChunksSha256 !== null) {
      const actual = this.chunksHash.copy().digest('hex');
      if (actual !== expectedChunksSha256) {
        throw new DigestMismatch(
          `chunks 1..${this.lastSeq} hash to ${actual}, the server says ${expectedChunksSha256}`,
          'chunks',
          expectedChunksSha256,
          actual,
          totalSeq,
          this.lastSeq,
        );
      }
      chunksVerified = true;
    }
    return { verified, chunksVerified };
  }
}

function compact(pieces: string[]): string {
  if (pieces.length > 1) {
    pieces.splice(0, pieces.length, pieces.join(''));
  }
  return pieces[0] ?? '';
}
