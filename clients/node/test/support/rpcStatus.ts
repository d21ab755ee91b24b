/**
 * Rich status details (grpc-status-details-bin) built by hand from the
 * protobuf wire format (protobuf.dev/programming-guides/encoding), the way
 * the gateway builds them: google.rpc.Status {code = 1, message = 2,
 * repeated Any details = 3}, Any {type_url = 1, value = 2},
 * google.rpc.RetryInfo {Duration retry_delay = 1}, Duration {seconds = 1,
 * nanos = 2}, ErrorInfo {reason = 1, domain = 2}.
 */
import * as grpc from '@grpc/grpc-js';

export function varint(value: number): Buffer {
  const bytes: number[] = [];
  let rest = value;
  while (rest > 0x7f) {
    bytes.push((rest & 0x7f) | 0x80);
    rest >>>= 7;
  }
  bytes.push(rest);
  return Buffer.from(bytes);
}

export function varintField(number: number, value: number): Buffer {
  return Buffer.concat([varint(number << 3), varint(value)]);
}

export function bytesField(number: number, value: Buffer | string): Buffer {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  return Buffer.concat([varint((number << 3) | 2), varint(bytes.length), bytes]);
}

export function richStatus(code: number, message: string, details: [string, Buffer][]): Buffer {
  const parts = [varintField(1, code), bytesField(2, message)];
  for (const [typeUrl, value] of details) {
    parts.push(bytesField(3, Buffer.concat([bytesField(1, typeUrl), bytesField(2, value)])));
  }
  return Buffer.concat(parts);
}

/** A google.rpc.RetryInfo of a whole number of milliseconds (>= 0). */
export function retryInfo(ms: number): [string, Buffer] {
  const seconds = Math.floor(ms / 1000);
  const nanos = (ms % 1000) * 1_000_000;
  const duration = Buffer.concat([
    seconds > 0 ? varintField(1, seconds) : Buffer.alloc(0),
    nanos > 0 ? varintField(2, nanos) : Buffer.alloc(0),
  ]);
  return ['type.googleapis.com/google.rpc.RetryInfo', bytesField(1, duration)];
}

export function errorInfo(reason: string): [string, Buffer] {
  return [
    'type.googleapis.com/google.rpc.ErrorInfo',
    Buffer.concat([bytesField(1, reason), bytesField(2, 'tokenrelay.v1')]),
  ];
}

/** Trailing metadata with the given rich details and plain entries. */
export function trailers(
  details: [string, Buffer][] | null,
  plain: Record<string, string> = {},
): grpc.Metadata {
  const metadata = new grpc.Metadata();
  if (details !== null) {
    metadata.set('grpc-status-details-bin', richStatus(8, 'shed', details));
  }
  for (const [key, value] of Object.entries(plain)) {
    metadata.set(key, value);
  }
  return metadata;
}
