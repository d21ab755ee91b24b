/**
 * tokenrelay: a Node client of the tokenrelay gateway (see client.ts).
 */
export {
  RelayClient,
  RelayStream,
  type GenerateOptions,
  type GenerateResult,
  type KeepaliveOptions,
  type ReconnectOptions,
  type RelayClientOptions,
  type ResumeOptions,
  type Sleep,
  type StreamOptions,
} from './client';
export {
  backoffDelay,
  isTransient,
  reconnectWait,
  startRetryWait,
  type BackoffSettings,
  type StartRetrySettings,
} from './decisions';
export { chunkRecord, chunksSha256, textSha256, type ChunkContent } from './assembly';
export {
  DigestMismatch,
  GenerationFailed,
  PartialAnswer,
  PartialStream,
  ProtocolViolation,
  ReconnectsExhausted,
  ResumeRejected,
  StreamFailed,
  TokenRelayClientError,
  type DeliveredSummary,
} from './errors';
export type {
  Checkpoint,
  Chunk,
  End,
  ErrorDetail,
  Notice,
  ReasoningChunk,
  Reconnected,
  Reconnecting,
  RelayEvent,
  Started,
  TextChunk,
  Throttled,
  ToolCall,
  ToolCallChunk,
  ToolCallDelta,
  Usage,
} from './events';
export type {
  GenerationInput,
  MessageInput,
  PolicyInput,
  ToolChoiceInput,
  ToolInput,
} from './wire';
export { assistantMessage, toolResult } from './messages';
