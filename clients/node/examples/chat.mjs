#!/usr/bin/env node
// Stream one answer from a tokenrelay gateway, as `tokenrelay chat` does:
// the answer on stdout as it arrives, everything else on stderr.
//
//   node examples/chat.mjs [options] [ADDRESS] [PROMPT]      (default 127.0.0.1:50051)
//
// Options (as `tokenrelay chat` takes them): --api-key KEY (default
// $TOKENRELAY_API_KEY), --tls-ca FILE, --tls-client-cert FILE, --tls-client-key FILE.
//
// A dropped connection is survived by the client itself (it resumes with the
// latest token after the last seq it holds); the end is checked against the
// server's digests before it is shown. Exit status: 0 for a complete answer,
// 2 for a partial one, 1 for no answer.
import { parseArgs } from 'node:util';

import { RelayClient, TokenRelayClientError } from 'tokenrelay';

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'api-key': { type: 'string' },
    'tls-ca': { type: 'string' },
    'tls-client-cert': { type: 'string' },
    'tls-client-key': { type: 'string' },
  },
});
const [address = '127.0.0.1:50051', prompt = 'Tell me how tokenrelay keeps a stream alive'] = positionals;

const client = new RelayClient(address, {
  apiKey: flags['api-key'],
  tlsCa: flags['tls-ca'],
  tlsClientCert: flags['tls-client-cert'],
  tlsClientKey: flags['tls-client-key'],
});
let status = 0;
try {
  const stream = client.stream('sim', [['user', prompt]], { metadata: { 'sim.pace_ms': '5' } });
  for await (const event of stream) {
    switch (event.type) {
      case 'chunk':
        if (event.kind === 'text') process.stdout.write(event.text);
        else if (event.kind === 'reasoning') process.stderr.write(`\x1b[2m${event.reasoning}\x1b[0m`);
        else process.stderr.write(`\n[tool call ${event.toolCall.name || '…'} ${event.toolCall.arguments}]\n`);
        break;
      case 'notice':
        process.stderr.write(`\n[gateway recovering: ${event.error.code} ${event.error.message}]\n`);
        break;
      case 'reconnecting':
        process.stderr.write(`\n[connection lost (${event.cause}); reconnecting in ${Math.round(event.delayMs)} ms]\n`);
        break;
      case 'reconnected':
        process.stderr.write(`[resumed after seq ${event.lastSeq}]\n`);
        break;
      case 'throttled':
        process.stderr.write(`[the gateway is busy (${event.cause}); trying again in ${Math.round(event.delayMs)} ms]\n`);
        break;
      case 'end':
        process.stdout.write('\n');
        process.stderr.write(
          `[${event.finishReason}: ${event.totalSeq} chunks, sha256 ${event.textSha256.slice(0, 12)}… ` +
            `${event.verified ? 'verified' : 'not verifiable'}, ${stream.reconnects} reconnect(s)]\n`,
        );
        if (event.partial) {
          process.stderr.write(`[partial answer: ${event.error?.code}: ${event.error?.message}]\n`);
          status = 2;
        }
        break;
    }
  }
} catch (error) {
  if (!(error instanceof TokenRelayClientError)) throw error;
  process.stderr.write(`\n${error.name}: ${error.message}\n`);
  status = error.partial !== null && error.partial.lastSeq > 0 ? 2 : 1;
} finally {
  client.close();
}
process.exitCode = status;
