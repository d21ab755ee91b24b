/**
 * Helpers for agent loops: the assistant turn a result stands for, and a
 * tool's answer to one of its calls, as messages for the next request.
 */
import type { ToolCall } from './events';
import type { MessageInput } from './wire';

/** The assistant message for a generation's result: its text and the tool
 * calls it made (send it back before the tool results). */
export function assistantMessage(result: {
  readonly text: string;
  readonly toolCalls: readonly ToolCall[];
}): MessageInput {
  return { role: 'assistant', content: result.text, toolCalls: [...result.toolCalls] };
}

/** A "tool" message answering the tool call with id `toolCallId`. */
export function toolResult(toolCallId: string, content: string): MessageInput {
  return { role: 'tool', toolCallId, content };
}
