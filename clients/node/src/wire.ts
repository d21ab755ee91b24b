/**
 * The protobuf boundary: the contract loaded from its .proto at run time
 * (@grpc/proto-loader), requests built from the client's plain options,
 * server messages turned into events, and grpc-status-details-bin decoded.
 * Nothing outside this module and client.ts touches wire objects.
 *
 * proto/ is the repository's protos/ copied by every build
 * (scripts/prepare-build.cjs), and src/generated/ holds the types
 * proto-loader-gen-types derives from the same copy with the options below
 * (package.json "build"), so the types, the loaded contract and the server's
 * contract cannot drift apart.
 */
import * as path from 'node:path';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as protobuf from 'protobufjs';

import type { ChunkContent } from './assembly';
import type { DeliveredSummary } from './errors';
import type { ErrorDetail, ToolCall } from './events';
import type { ProtoGrpcType } from './generated/relay';
import type { RelayClient as RelayStub } from './generated/tokenrelay/v1/Relay';
import type { Message as WireMessage } from './generated/tokenrelay/v1/Message';
import type { RecoveryPolicy as WirePolicy } from './generated/tokenrelay/v1/RecoveryPolicy';
import type { StartGeneration as WireStart } from './generated/tokenrelay/v1/StartGeneration';
import type { StreamError__Output as WireError } from './generated/tokenrelay/v1/StreamError';
import type { StreamEvent__Output } from './generated/tokenrelay/v1/StreamEvent';
import type { StreamRequest } from './generated/tokenrelay/v1/StreamRequest';
import type { TokenChunk__Output as WireChunk } from './generated/tokenrelay/v1/TokenChunk';
import type { Tool as WireTool } from './generated/tokenrelay/v1/Tool';
import type { ToolChoice as WireToolChoice } from './generated/tokenrelay/v1/ToolChoice';

export type { RelayStub, StreamEvent__Output as WireEvent, StreamRequest as WireRequest };
export type WireCall = grpc.ClientDuplexStream<StreamRequest, StreamEvent__Output>;

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');
const RELAY_PROTO = 'tokenrelay/v1/relay.proto';

// Must match the flags of proto-loader-gen-types in package.json.
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

type RelayService = ProtoGrpcType['tokenrelay']['v1']['Relay'];

let loaded: { Relay: RelayService; root: protobuf.Root } | null = null;

function contract(): { Relay: RelayService; root: protobuf.Root } {
  if (loaded === null) {
    const definition = protoLoader.loadSync(RELAY_PROTO, LOADER_OPTIONS);
    const proto = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
    // protobufjs reads the same file to decode the StreamError packed in a
    // status's details (proto-loader only serializes service messages).
    const root = protobuf.loadSync(path.join(PROTO_DIR, RELAY_PROTO));
    loaded = { Relay: proto.tokenrelay.v1.Relay, root };
  }
  return loaded;
}

export function newStub(
  address: string,
  credentials: grpc.ChannelCredentials,
  options: grpc.ChannelOptions,
): RelayStub {
  return new (contract().Relay)(address, credentials, options);
}

/** @internal The Relay service as loaded (the tests serve scripted answers with it). */
export function relayServiceDefinition(): RelayService['service'] {
  return contract().Relay.service;
}

/** @internal A message type of the contract, to encode details in tests. */
export function contractType(name: string): protobuf.Type {
  return contract().root.lookupType(name);
}

// --- requests ------------------------------------------------------------------

/** One message of the conversation: a [role, content] pair or an object. An
 * assistant message may carry the tool calls the model made; a "tool"
 * message answers one of them by id. */
export type MessageInput =
  | readonly [role: string, content: string]
  | {
      readonly role: string;
      readonly content?: string;
      readonly toolCalls?: readonly ToolCall[];
      readonly toolCallId?: string;
    };

/** A tool the model may call. `parameters` is a JSON Schema object (or its
 * JSON text); omitted: no arguments. */
export interface ToolInput {
  readonly name: string;
  readonly description?: string;
  readonly parameters?: Readonly<Record<string, unknown>> | string;
}

/** "auto", "none", "required", or one tool by name. */
export type ToolChoiceInput = 'auto' | 'none' | 'required' | { readonly tool: string };

/** Per-call overrides of the gateway's recovery policy (RecoveryPolicy). */
export interface PolicyInput {
  readonly maxRetries?: number;
  readonly allowFallback?: boolean;
  /** false: a stream the gateway gives up on fails with GenerationFailed
   * instead of ending partial. */
  readonly allowPartial?: boolean;
  readonly checkpointInterval?: number;
  /** "whole" (default): a tool call arrives as one chunk once complete;
   * "stream": deltas as they arrive, and a break inside one ends the stream
   * partial with TOOL_CALL_INTERRUPTED. */
  readonly toolCalls?: 'whole' | 'stream';
}

export interface GenerationInput {
  readonly maxTokens?: number;
  readonly temperature?: number;
  readonly topP?: number;
  readonly stop?: readonly string[] | string;
  readonly policy?: PolicyInput;
  readonly metadata?: Readonly<Record<string, string>>;
  readonly tools?: readonly ToolInput[];
  readonly toolChoice?: ToolChoiceInput;
}

const POLICY_FIELDS: readonly (keyof PolicyInput)[] = [
  'maxRetries',
  'allowFallback',
  'allowPartial',
  'checkpointInterval',
  'toolCalls',
];

function describe(value: unknown): string {
  return value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value;
}

function requireString(value: unknown, field: string): string {
  if (typeof value !== 'string') {
    throw new TypeError(`${field} must be a string, got ${describe(value)}`);
  }
  return value;
}

function requireCount(value: unknown, field: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
    throw new TypeError(`${field} must be a whole number of 0 or more, got ${String(value)}`);
  }
  return value;
}

function toWireToolCall(call: ToolCall, field: string): { id: string; name: string; argumentsJson: string } {
  return {
    id: requireString(call.id, `${field}.id`),
    name: requireString(call.name, `${field}.name`),
    argumentsJson: requireString(call.arguments, `${field}.arguments`),
  };
}

export function toWireMessage(message: MessageInput, field: string): WireMessage {
  if (Array.isArray(message)) {
    if (message.length !== 2) {
      throw new TypeError(`${field} must be [role, content], got ${message.length} item(s)`);
    }
    return {
      role: requireString(message[0], `${field}[0] (role)`),
      content: requireString(message[1], `${field}[1] (content)`),
    };
  }
  if (typeof message !== 'object' || message === null) {
    throw new TypeError(`${field} must be [role, content] or {role, content}, got ${describe(message)}`);
  }
  const object = message as Exclude<MessageInput, readonly [string, string]>;
  const wire: WireMessage = {
    role: requireString(object.role, `${field}.role`),
    content: object.content === undefined ? '' : requireString(object.content, `${field}.content`),
  };
  if (object.toolCalls !== undefined) {
    if (!Array.isArray(object.toolCalls)) {
      throw new TypeError(`${field}.toolCalls must be an array, got ${describe(object.toolCalls)}`);
    }
    wire.toolCalls = object.toolCalls.map((call, index) =>
      toWireToolCall(call, `${field}.toolCalls[${index}]`),
    );
  }
  if (object.toolCallId !== undefined) {
    wire.toolCallId = requireString(object.toolCallId, `${field}.toolCallId`);
  }
  return wire;
}

function toWireTool(tool: ToolInput, field: string): WireTool {
  if (typeof tool !== 'object' || tool === null) {
    throw new TypeError(`${field} must be {name, description, parameters}, got ${describe(tool)}`);
  }
  let parametersJson = '';
  if (typeof tool.parameters === 'string') {
    parametersJson = tool.parameters;
  } else if (tool.parameters !== undefined) {
    if (typeof tool.parameters !== 'object' || tool.parameters === null) {
      throw new TypeError(
        `${field}.parameters must be a JSON Schema object or its JSON text, got ${describe(tool.parameters)}`,
      );
    }
    parametersJson = JSON.stringify(tool.parameters);
  }
  return {
    name: requireString(tool.name, `${field}.name`),
    description: tool.description === undefined ? '' : requireString(tool.description, `${field}.description`),
    parametersJson,
  };
}

function toWireToolChoice(choice: ToolChoiceInput): WireToolChoice {
  switch (choice) {
    case 'auto':
      return { mode: 'TOOL_CHOICE_MODE_AUTO' };
    case 'none':
      return { mode: 'TOOL_CHOICE_MODE_NONE' };
    case 'required':
      return { mode: 'TOOL_CHOICE_MODE_REQUIRED' };
    default:
      if (typeof choice === 'object' && choice !== null && typeof choice.tool === 'string') {
        return { toolName: choice.tool };
      }
      throw new TypeError(
        `toolChoice must be "auto", "none", "required" or {tool: name}, got ${JSON.stringify(choice)}`,
      );
  }
}

export function toWirePolicy(policy: PolicyInput): WirePolicy {
  const unknown = Object.keys(policy).filter(
    (key) => !(POLICY_FIELDS as readonly string[]).includes(key),
  );
  if (unknown.length > 0) {
    throw new TypeError(
      `unknown recovery policy field(s) ${unknown.join(', ')}; known: ${POLICY_FIELDS.join(', ')}`,
    );
  }
  const wire: WirePolicy = {};
  if (policy.maxRetries !== undefined) {
    wire.maxRetries = requireCount(policy.maxRetries, 'policy.maxRetries');
  }
  if (policy.checkpointInterval !== undefined) {
    wire.checkpointInterval = requireCount(policy.checkpointInterval, 'policy.checkpointInterval');
  }
  for (const field of ['allowFallback', 'allowPartial'] as const) {
    const value = policy[field];
    if (value !== undefined) {
      if (typeof value !== 'boolean') {
        throw new TypeError(`policy.${field} must be true or false, got ${describe(value)}`);
      }
      wire[field] = value;
    }
  }
  if (policy.toolCalls !== undefined) {
    if (policy.toolCalls === 'whole') {
      wire.toolCalls = 'TOOL_CALL_MODE_WHOLE';
    } else if (policy.toolCalls === 'stream') {
      wire.toolCalls = 'TOOL_CALL_MODE_STREAM';
    } else {
      throw new TypeError(
        `policy.toolCalls must be "whole" or "stream", got ${JSON.stringify(policy.toolCalls)}`,
      );
    }
  }
  return wire;
}

export function toWireStart(
  model: string,
  messages: Iterable<MessageInput>,
  options: GenerationInput,
  idempotencyKey: string,
): WireStart {
  if (messages === null || typeof messages !== 'object' || !(Symbol.iterator in messages)) {
    throw new TypeError(`messages must be an array of messages, got ${describe(messages)}`);
  }
  const params: NonNullable<WireStart['params']> = {};
  if (options.maxTokens !== undefined) {
    params.maxTokens = requireCount(options.maxTokens, 'maxTokens');
  }
  for (const field of ['temperature', 'topP'] as const) {
    const value = options[field];
    if (value !== undefined) {
      if (typeof value !== 'number' || !Number.isFinite(value)) {
        throw new TypeError(`${field} must be a number, got ${describe(value)}`);
      }
      params[field] = value;
    }
  }
  if (options.stop !== undefined) {
    const stop = typeof options.stop === 'string' ? [options.stop] : [...options.stop];
    params.stop = stop.map((value, index) => requireString(value, `stop[${index}]`));
  }
  const metadata: Record<string, string> = {};
  for (const [key, value] of Object.entries(options.metadata ?? {})) {
    metadata[key] = requireString(value, `metadata[${JSON.stringify(key)}]`);
  }
  const start: WireStart = {
    model: requireString(model, 'model'),
    messages: [...messages].map((message, index) => toWireMessage(message, `messages[${index}]`)),
    params,
    idempotencyKey,
    metadata,
    tools: (options.tools ?? []).map((tool, index) => toWireTool(tool, `tools[${index}]`)),
  };
  if (options.policy !== undefined) {
    start.policy = toWirePolicy(options.policy);
  }
  if (options.toolChoice !== undefined) {
    start.toolChoice = toWireToolChoice(options.toolChoice);
  }
  return start;
}

// --- server messages -------------------------------------------------------------

/** A chunk's content. A chunk with none of the three set (a newer kind this
 * client does not know) counts as empty text, as proto3 reads it. */
export function chunkContent(chunk: WireChunk): ChunkContent {
  switch (chunk.content) {
    case 'reasoning':
      return { kind: 'reasoning', reasoning: chunk.reasoning ?? '' };
    case 'toolCall': {
      const delta = chunk.toolCall;
      return {
        kind: 'toolCall',
        toolCall: {
          index: delta?.index ?? 0,
          id: delta?.id ?? '',
          name: delta?.name ?? '',
          arguments: delta?.arguments ?? '',
        },
      };
    }
    default:
      return { kind: 'text', text: chunk.text ?? '' };
  }
}

function enumName(value: string, prefix: string): string {
  if (value.endsWith('_UNSPECIFIED') || value === '') {
    return '';
  }
  return value.startsWith(prefix) ? value.slice(prefix.length).toLowerCase() : value.toLowerCase();
}

interface DurationLike {
  seconds?: number | string | null;
  nanos?: number | null;
}

function durationMs(duration: DurationLike | null | undefined): number | null {
  if (duration === null || duration === undefined) {
    return null;
  }
  return Number(duration.seconds ?? 0) * 1000 + (duration.nanos ?? 0) / 1e6;
}

export function toErrorDetail(error: WireError): ErrorDetail {
  return {
    type: enumName(String(error.type), 'ERROR_TYPE_'),
    code: error.code,
    message: error.message,
    retryable: error.retryable,
    suggestedAction: enumName(String(error.suggestedAction), 'SUGGESTED_ACTION_'),
    fatal: error.fatal,
    bytesReceived: Number(error.bytesReceived),
    tokensReceived: Number(error.tokensReceived),
    provider: error.provider,
    attempt: error.attempt,
    retryAfterMs: durationMs(error.retryAfter),
  };
}

// --- grpc-status-details-bin ---------------------------------------------------------

// google.rpc.Status, google.protobuf.Any, google.rpc.ErrorInfo and
// google.protobuf.Duration by their wire shape (field numbers from
// googleapis google/rpc/status.proto and error_details.proto; the names of
// the messages are not on the wire).
const RPC_TYPES = protobuf.parse(`
  syntax = "proto3";
  package tokenrelay_client.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message Duration { int64 seconds = 1; int32 nanos = 2; }
  message RetryInfo { Duration retry_delay = 1; }
`).root;
const STATUS_TYPE = RPC_TYPES.lookupType('tokenrelay_client.rpc.Status');
const ERROR_INFO_TYPE = RPC_TYPES.lookupType('tokenrelay_client.rpc.ErrorInfo');
const RETRY_INFO_TYPE = RPC_TYPES.lookupType('tokenrelay_client.rpc.RetryInfo');

const STREAM_ERROR_URL = 'tokenrelay.v1.StreamError';
const ERROR_INFO_URL = 'google.rpc.ErrorInfo';
const RETRY_INFO_URL = 'google.rpc.RetryInfo';
/** Trailing metadata of a refused start: how long to wait, in whole
 * milliseconds (the gateway sends it with the RetryInfo, which wins). */
export const RETRY_AFTER_MS = 'retry-after-ms';

interface RpcDetail {
  readonly typeUrl?: string;
  readonly value?: Uint8Array;
}

/** The details of the google.rpc.Status in grpc-status-details-bin; null
 * when there is none or it cannot be read. */
function statusDetails(metadata: grpc.Metadata | undefined): RpcDetail[] | null {
  const raw = metadata?.get('grpc-status-details-bin')[0];
  if (!(raw instanceof Buffer)) {
    return null;
  }
  try {
    const status = STATUS_TYPE.toObject(STATUS_TYPE.decode(raw), { defaults: true }) as {
      details?: RpcDetail[];
    };
    return status.details ?? [];
  } catch {
    return null;
  }
}

/** The wait a refusal advises, in milliseconds: its google.rpc.RetryInfo,
 * else its `retry-after-ms` trailing metadata (whole milliseconds, ASCII
 * digits); null when it says nothing (or nothing readable). */
export function advisedWaitMs(metadata: grpc.Metadata | undefined): number | null {
  for (const detail of statusDetails(metadata) ?? []) {
    if (typeName(detail.typeUrl ?? '') !== RETRY_INFO_URL) {
      continue;
    }
    try {
      const info = RETRY_INFO_TYPE.toObject(
        RETRY_INFO_TYPE.decode(detail.value ?? new Uint8Array()),
        { longs: Number, defaults: true },
      ) as { retryDelay?: DurationLike | null };
      const waitMs = durationMs(info.retryDelay ?? { seconds: 0, nanos: 0 });
      if (waitMs !== null && Number.isFinite(waitMs)) {
        return waitMs;
      }
    } catch {
      // An unreadable RetryInfo is no advice; the header may still say.
    }
  }
  for (const value of metadata?.get(RETRY_AFTER_MS) ?? []) {
    if (typeof value === 'string' && /^[0-9]+$/.test(value.trim())) {
      return Number(value.trim());
    }
  }
  return null;
}

function typeName(typeUrl: string): string {
  return typeUrl.slice(typeUrl.lastIndexOf('/') + 1);
}

export interface RefusedPartial {
  readonly error: ErrorDetail;
  readonly delivered: DeliveredSummary;
}

/** The StreamError (and what was delivered, from the ErrorInfo) that a
 * status's rich details carry, or null when they carry none (or cannot be
 * read: a status we cannot read is judged by its code alone). */
export function refusedPartial(metadata: grpc.Metadata | undefined): RefusedPartial | null {
  const details = statusDetails(metadata);
  if (details === null) {
    return null;
  }
  let error: ErrorDetail | null = null;
  let info: Record<string, string> = {};
  const errorType = contract().root.lookupType(STREAM_ERROR_URL);
  for (const detail of details) {
    const name = typeName(detail.typeUrl ?? '');
    try {
      if (name === STREAM_ERROR_URL) {
        const wire = errorType.toObject(errorType.decode(detail.value ?? new Uint8Array()), {
          enums: String,
          longs: Number,
          defaults: true,
        }) as WireError;
        error = toErrorDetail(wire);
      } else if (name === ERROR_INFO_URL) {
        const decoded = ERROR_INFO_TYPE.toObject(
          ERROR_INFO_TYPE.decode(detail.value ?? new Uint8Array()),
          { defaults: true },
        ) as { metadata?: Record<string, string> };
        info = decoded.metadata ?? {};
      }
    } catch {
      // A detail we cannot decode is skipped, as an unknown one is.
    }
  }
  if (error === null) {
    return null;
  }
  const rawTotal = info['total_seq'] ?? '';
  return {
    error,
    delivered: {
      totalSeq: /^[0-9]+$/.test(rawTotal) ? Number(rawTotal) : null,
      textSha256: info['text_sha256'] ?? '',
      chunksSha256: info['chunks_sha256'] ?? '',
    },
  };
}
