/** Assembling chunks and the two digests of the contract (pure). */
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';

import { Assembly, type ChunkContent, chunkRecord, chunksSha256, textSha256 } from '../src/assembly';
import { DigestMismatch, ProtocolViolation } from '../src/errors';

function sha256(bytes: Buffer | string): string {
  return createHash('sha256').update(bytes).digest('hex');
}

const text = (value: string): ChunkContent => ({ kind: 'text', text: value });
const reasoning = (value: string): ChunkContent => ({ kind: 'reasoning', reasoning: value });
const call = (index: number, id: string, name: string, args: string): ChunkContent => ({
  kind: 'toolCall',
  toolCall: { index, id, name, arguments: args },
});

function assembled(contents: readonly ChunkContent[]): Assembly {
  const assembly = Assembly.fresh();
  contents.forEach((content, position) => assembly.accept(position + 1, content));
  return assembly;
}

describe('chunk records (relay.proto, StreamEnd.chunks_sha256)', () => {
  // Each record written out byte by byte from the contract's text, not with
  // the encoder under test.
  const rows: [string, ChunkContent, number[]][] = [
    ['a text chunk is T, its UTF-8 length, its UTF-8', text('hé'), [0x54, 0, 0, 0, 3, 0x68, 0xc3, 0xa9]],
    ['a reasoning chunk is R, its length, its text', reasoning('ok'), [0x52, 0, 0, 0, 2, 0x6f, 0x6b]],
    ['an empty text chunk still counts its length', text(''), [0x54, 0, 0, 0, 0]],
    [
      'a tool call is C, the index, then id, name and arguments each sized',
      call(258, 'c1', 'f', '{}'),
      [0x43, 0, 0, 1, 2, 0, 0, 0, 2, 0x63, 0x31, 0, 0, 0, 1, 0x66, 0, 0, 0, 2, 0x7b, 0x7d],
    ],
    [
      'a later piece of a tool call has empty id and name',
      call(0, '', '', '1'),
      [0x43, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x31],
    ],
  ];
  for (const [id, content, bytes] of rows) {
    test(id, () => {
      assert.deepEqual([...chunkRecord(content)], bytes);
    });
  }

  test('the chunks digest hashes the records in seq order', () => {
    const contents = [text('a'), reasoning('b'), call(0, 'x', 'y', 'z')];
    const expected = sha256(Buffer.concat(contents.map(chunkRecord)));
    assert.equal(chunksSha256(contents), expected);
    assert.notEqual(chunksSha256([...contents].reverse()), expected);
  });

  test('the text digest is SHA-256 of the UTF-8 text', () => {
    assert.equal(textSha256('日本語 🚀'), sha256(Buffer.from('日本語 🚀', 'utf8')));
  });
});

describe('Assembly', () => {
  test('text, reasoning and tool calls are assembled apart, each in seq order', () => {
    const assembly = assembled([
      reasoning('think '),
      reasoning('hard'),
      text('Let me '),
      call(1, 'call_b', 'lookup', '{"q":'),
      call(0, 'call_a', 'weather', '{"city":"Oslo"}'),
      call(1, '', '', '"x"}'),
      text('check.'),
    ]);
    assert.equal(assembly.text, 'Let me check.');
    assert.equal(assembly.reasoning, 'think hard');
    assert.deepEqual(assembly.toolCalls(), [
      { id: 'call_a', name: 'weather', arguments: '{"city":"Oslo"}' },
      { id: 'call_b', name: 'lookup', arguments: '{"q":"x"}' },
    ]);
    assert.equal(assembly.lastSeq, 7);
  });

  test('the text digest covers only the text; the chunks digest covers everything', () => {
    const contents = [text('a'), reasoning('r'), call(0, 'i', 'n', '{}'), text('b')];
    const assembly = assembled(contents);
    assert.deepEqual(assembly.verify(4, textSha256('ab'), chunksSha256(contents)), {
      verified: true,
      chunksVerified: true,
    });
  });

  test('a chunk at or below the last seq is a duplicate and changes nothing', () => {
    const assembly = assembled([text('a'), text('b')]);
    assert.equal(assembly.accept(2, text('b')), false);
    assert.equal(assembly.accept(1, text('zzz')), false);
    assert.equal(assembly.text, 'ab');
    assert.deepEqual(assembly.verify(2, textSha256('ab'), chunksSha256([text('a'), text('b')])), {
      verified: true,
      chunksVerified: true,
    });
  });

  test('a gap is a protocol violation that names the missing chunks', () => {
    const assembly = assembled([text('a')]);
    assert.throws(() => assembly.accept(4, text('d')), (error: unknown) => {
      assert.ok(error instanceof ProtocolViolation);
      assert.match(error.message, /2 chunk\(s\) missing/);
      return true;
    });
  });

  test('a tool call whose later piece changes its id is a protocol violation', () => {
    const assembly = assembled([call(0, 'a', 'f', '{')]);
    assert.throws(() => assembly.accept(2, call(0, 'b', '', '}')), {
      name: 'ProtocolViolation',
      message: /tool call 0 changed its id from "a" to "b"/,
    });
  });

  test('a later piece may repeat the id and name', () => {
    const assembly = assembled([call(0, 'a', 'f', '{'), call(0, 'a', 'f', '}')]);
    assert.deepEqual(assembly.toolCalls(), [{ id: 'a', name: 'f', arguments: '{}' }]);
  });

  const mismatches: [string, () => void, DigestMismatch['which']][] = [
    ['another text is a text mismatch', () => assembled([text('a')]).verify(1, textSha256('b'), null), 'text'],
    [
      'another tool call is a chunks mismatch though the text matches',
      () => assembled([call(0, 'i', 'n', '{}')]).verify(1, textSha256(''), chunksSha256([call(0, 'i', 'n', '{ }')])),
      'chunks',
    ],
    ['a missing chunk is a count mismatch', () => assembled([text('a')]).verify(2, textSha256('a'), null), 'count'],
    ['an empty text digest from the server is a mismatch', () => assembled([text('a')]).verify(1, '', null), 'text'],
  ];
  for (const [id, check, which] of mismatches) {
    test(id, () => {
      assert.throws(check, (error: unknown) => {
        assert.ok(error instanceof DigestMismatch);
        assert.equal(error.which, which);
        return true;
      });
    });
  }

  test('no chunks digest from the server: the text is verified, the chunks are not', () => {
    assert.deepEqual(assembled([text('a')]).verify(1, textSha256('a'), null), {
      verified: true,
      chunksVerified: false,
    });
  });

  test('a resume with the earlier text verifies the text but cannot verify the chunks', () => {
    const assembly = Assembly.after(2, 'ab');
    assembly.accept(3, text('c'));
    assert.deepEqual(assembly.verify(3, textSha256('abc'), chunksSha256([text('a'), text('b'), text('c')])), {
      verified: true,
      chunksVerified: false,
    });
  });

  test('a resume without the earlier text checks only the count', () => {
    const assembly = Assembly.after(2, null);
    assembly.accept(3, text('c'));
    assert.deepEqual(assembly.verify(3, textSha256('whatever'), null), {
      verified: false,
      chunksVerified: false,
    });
    assert.throws(() => assembly.verify(4, textSha256('abc'), null), { name: 'DigestMismatch' });
  });

  test('a copy goes on from the same point without touching the original', () => {
    const original = assembled([text('a'), call(0, 'i', 'n', '{')]);
    const copy = original.copy();
    copy.accept(3, call(0, '', '', '}'));
    copy.accept(4, text('b'));
    assert.equal(original.lastSeq, 2);
    assert.deepEqual(original.toolCalls(), [{ id: 'i', name: 'n', arguments: '{' }]);
    const all = [text('a'), call(0, 'i', 'n', '{'), call(0, '', '', '}'), text('b')];
    assert.deepEqual(copy.verify(4, textSha256('ab'), chunksSha256(all)), {
      verified: true,
      chunksVerified: true,
    });
  });
});
