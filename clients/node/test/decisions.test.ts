/** The client's pure decisions, with the Python client's tables. */
import { strict as assert } from 'node:assert';
import { describe, test } from 'node:test';

import { status } from '@grpc/grpc-js';

import { backoffDelay, isTransient, reconnectWait } from '../src/decisions';

describe('backoffDelay', () => {
  const rows: [string, number, number, number, number, number, number][] = [
    // [id, attempt, baseMs, capMs, jitter, random, expected]
    ['the first attempt waits the base', 1, 1000, 30_000, 0.1, 0.5, 1000],
    ['the second attempt doubles', 2, 1000, 30_000, 0.1, 0.5, 2000],
    ['the third attempt doubles again', 3, 1000, 30_000, 0.1, 0.5, 4000],
    ['the lowest jitter takes ten percent off', 1, 1000, 30_000, 0.1, 0, 900],
    ['the highest jitter adds ten percent', 1, 1000, 30_000, 0.1, 1, 1100],
    ['the cap bounds the exponential', 6, 1000, 30_000, 0.1, 0.5, 30_000],
    ['jitter never pushes past the cap', 6, 1000, 30_000, 0.1, 1, 30_000],
    ['jitter at the cap only shortens', 6, 1000, 30_000, 0.1, 0, 27_000],
    ['no jitter ignores the random source', 4, 250, 30_000, 0, 0.9, 2000],
    ['a zero base never waits', 3, 0, 30_000, 0.5, 0, 0],
    ['huge attempts stay at the cap', 40, 1000, 30_000, 0.1, 0.5, 30_000],
  ];
  for (const [id, attempt, baseMs, capMs, jitter, random, expected] of rows) {
    test(id, () => {
      const delay = backoffDelay(attempt, { baseMs, capMs, jitter }, () => random);
      assert.ok(Math.abs(delay - expected) < 1e-9, `${delay} != ${expected}`);
    });
  }

  test('attempt zero is refused', () => {
    assert.throws(() => backoffDelay(0, { baseMs: 1000, capMs: 30_000, jitter: 0.1 }, () => 0.5), {
      name: 'RangeError',
      message: /attempt/,
    });
  });
});

describe('isTransient', () => {
  const rows: [string, status, string, boolean][] = [
    ['draining reconnects', status.UNAVAILABLE, 'draining', true],
    ['a dropped connection reconnects', status.UNAVAILABLE, 'Connection dropped', true],
    ['a remote cancel resumes', status.CANCELLED, 'Cancelled on client', true],
    [
      'internal from a broken transport reconnects',
      status.INTERNAL,
      'Received RST_STREAM with code 2 triggered by internal client error: read ECONNRESET',
      true,
    ],
    ['an unknown status from a reset reconnects', status.UNKNOWN, 'read ECONNRESET', true],
    ['a real server error is final', status.INTERNAL, 'incident 7f3a: unexpected error', false],
    ['an unknown server exception is final', status.UNKNOWN, 'Exception calling application', false],
    ['a bad request is final', status.INVALID_ARGUMENT, 'start.model', false],
    ['a foreign token is final', status.PERMISSION_DENIED, 'token', false],
    ['an expired stream is final', status.NOT_FOUND, 'expired', false],
    ['a quota is final', status.RESOURCE_EXHAUSTED, 'quota', false],
    ['a deadline is final', status.DEADLINE_EXCEEDED, 'deadline', false],
  ];
  for (const [id, code, details, expected] of rows) {
    test(id, () => {
      assert.equal(isTransient(code, details), expected);
    });
  }
});

describe('reconnectWait', () => {
  const rows: [string, number, number | null, number][] = [
    // [id, backoff ms, advised ms, expected]; the cap is 30 s
    ['no advice: the backoff', 1000, null, 1000],
    ['a longer advice is waited (a refused takeover)', 1000, 2500, 2500],
    ['a shorter advice does not cut the backoff', 4000, 2500, 4000],
    ['an advice past the cap waits the cap', 1000, 90_000, 30_000],
    ['a negative advice is the backoff', 1000, -1000, 1000],
  ];
  for (const [id, backoffMs, advisedMs, expected] of rows) {
    test(id, () => {
      assert.equal(reconnectWait(backoffMs, advisedMs, 30_000), expected);
    });
  }
});
