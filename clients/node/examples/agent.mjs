#!/usr/bin/env node
// One agent loop through a tokenrelay gateway: the model calls a tool, the
// loop runs it and sends the result back, until the model answers in text.
//
//   node examples/agent.mjs [ADDRESS] [QUESTION] [MODEL]   (default 127.0.0.1:50051, model sim)
//
// The simulated model (`sim`) calls the tool it is offered when the
// conversation ends with a question, and answers once it has the result; a
// real model behind the gateway does the same in earnest. Each turn's tool
// calls arrive whole (policy toolCalls "whole", the default): a broken
// upstream inside a call's arguments is recovered by the gateway and never
// shows half a call. The reasoning, tool calls and final answer are printed
// as they arrive; every turn is checked against the server's digests.
import { RelayClient, assistantMessage, toolResult } from 'tokenrelay';

const [address = '127.0.0.1:50051', question = 'What is the weather in Oslo?', model = 'sim'] =
  process.argv.slice(2);

const tools = [
  {
    name: 'get_weather',
    description: 'The current weather of a city',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string' } },
      required: ['city'],
    },
  },
];

// The tools this agent can run, by name: arguments JSON in, result JSON out.
const implementations = {
  get_weather: ({ city }) => ({ city, temperature_c: 7, sky: 'overcast' }),
};

function run(call) {
  const implementation = implementations[call.name];
  if (implementation === undefined) {
    return JSON.stringify({ error: `no tool named ${call.name}` });
  }
  return JSON.stringify(implementation(JSON.parse(call.arguments)));
}

const MAX_TURNS = 4;
const client = new RelayClient(address);
const messages = [['user', question]];
let status = 1;
try {
  for (let turn = 1; turn <= MAX_TURNS; turn += 1) {
    const stream = client.stream(model, messages, { tools, maxTokens: 40 });
    for await (const event of stream) {
      if (event.type === 'chunk' && event.kind === 'text') process.stdout.write(event.text);
      if (event.type === 'chunk' && event.kind === 'reasoning') process.stderr.write(`\x1b[2m${event.reasoning}\x1b[0m`);
    }
    const end = stream.end;
    const calls = stream.toolCalls();
    process.stderr.write(
      `\n[turn ${turn}: ${end.finishReason}, ${end.totalSeq} chunks, ` +
        `${end.chunksVerified ? 'every chunk verified' : end.verified ? 'text verified' : 'not verifiable'}]\n`,
    );
    if (end.partial) {
      process.stderr.write(`[partial answer: ${end.error?.code}: ${end.error?.message}]\n`);
      status = 2;
      break;
    }
    if (end.finishReason !== 'tool_calls') {
      process.stdout.write('\n');
      status = 0;
      break;
    }
    if (stream.text) process.stdout.write('\n');
    messages.push(assistantMessage({ text: stream.text, toolCalls: calls }));
    for (const call of calls) {
      const result = run(call);
      process.stderr.write(`[${call.name}(${call.arguments}) -> ${result}]\n`);
      messages.push(toolResult(call.id, result));
    }
  }
} finally {
  client.close();
}
process.exitCode = status;
