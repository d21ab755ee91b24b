/**
 * `buf curl` (npm @bufbuild/buf, the real binary) against a real gateway
 * with gRPC reflection v1 only (`--reflect-protocol grpc-v1`): the methods
 * it lists, a health check, a Stream call and a resume with its token. The
 * binary is a devDependency: when it cannot run, this fails (npm ci
 * installs it).
 */
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { type Gateway, REPO_ROOT, startGateway } from './support/gateway';

const run = promisify(execFile);
const BUF = path.resolve(__dirname, '..', '..', 'node_modules', '.bin', 'buf');

let gateway: Gateway;
let cacheDir: string;

before(async () => {
  assert.ok(existsSync(BUF), `${BUF} not found: run npm ci in clients/node`);
  cacheDir = mkdtempSync(path.join(tmpdir(), 'buf-cache-'));
  gateway = await startGateway();
});

after(async () => {
  await gateway.stop();
  rmSync(cacheDir, { recursive: true, force: true });
});

async function bufCurl(method: string, data?: unknown, ...extra: string[]): Promise<{ stdout: string; stderr: string }> {
  const args = ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', '--reflect-protocol', 'grpc-v1', ...extra];
  if (data !== undefined) {
    args.push('-d', JSON.stringify(data));
  }
  args.push(`http://${gateway.address}${method}`);
  return run(BUF, args, { env: { ...process.env, BUF_CACHE_DIR: cacheDir } });
}

/** buf prints each message as an indented JSON document starting at column 0. */
function documents(stdout: string): Record<string, Record<string, unknown>>[] {
  return stdout
    .trim()
    .split(/\n(?=\{)/)
    .map((text) => JSON.parse(text) as Record<string, Record<string, unknown>>);
}

test('buf --version runs the real binary', async () => {
  const { stdout, stderr } = await run(BUF, ['--version']);
  assert.match(`${stdout}${stderr}`, /^1\.\d+\.\d+/);
});

test('the methods are listed through reflection v1', async () => {
  const { stdout } = await bufCurl('', undefined, '--list-methods');
  const methods = stdout.trim().split('\n');
  for (const method of [
    'grpc.health.v1.Health/Check',
    'grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
    'tokenrelay.v1.Relay/Stream',
  ]) {
    assert.ok(methods.includes(method), `${method} missing from ${JSON.stringify(methods)}`);
  }
});

test('a health check is SERVING, resolved through reflection v1 and not v1alpha', async () => {
  const { stdout, stderr } = await bufCurl('/grpc.health.v1.Health/Check', { service: 'tokenrelay.v1.Relay' }, '-v');
  assert.deepEqual(JSON.parse(stdout), { status: 'SERVING' });
  assert.match(stderr, /POST \/grpc\.reflection\.v1\.ServerReflection\/ServerReflectionInfo/);
  assert.doesNotMatch(stderr, /v1alpha/);
});

test('a Stream call and a resume with its token', async () => {
  const { stdout } = await bufCurl('/tokenrelay.v1.Relay/Stream', {
    start: { model: 'sim', messages: [{ role: 'user', content: 'hi' }], params: { max_tokens: 3 } },
  });
  const events = documents(stdout);
  assert.deepEqual(events.map((event) => Object.keys(event)[0]), ['started', 'chunk', 'chunk', 'chunk', 'end']);
  const started = events[0]?.['started'] ?? {};
  assert.match(String(started['streamId']), /^[0-9a-f]{32}$/);
  assert.match(String(started['resumeToken']), new RegExp(`^v2\\.[\\w-]+\\.[\\w-]+\\.${String(started['streamId'])}\\.\\d+\\.\\d+\\.[\\w-]+$`));
  // protojson: camelCase names, 64-bit integers as strings.
  const chunks = events.slice(1, 4).map((event) => event['chunk'] ?? {});
  assert.deepEqual(chunks.map((chunk) => chunk['seq']), ['1', '2', '3']);
  const text = chunks.map((chunk) => String(chunk['text'])).join('');
  const end = events[4]?.['end'] ?? {};
  assert.equal(end['finishReason'], 'stop');
  assert.equal(end['totalSeq'], '3');
  assert.equal(end['textSha256'], createHash('sha256').update(text).digest('hex'));

  const resumed = documents(
    (
      await bufCurl('/tokenrelay.v1.Relay/Stream', {
        resume: { resume_token: started['resumeToken'], last_seq: 1 },
      })
    ).stdout,
  );
  assert.deepEqual(resumed.map((event) => Object.keys(event)[0]), ['started', 'chunk', 'chunk', 'end']);
  assert.equal(resumed[0]?.['started']?.['resumed'], true);
  assert.equal(resumed[0]?.['started']?.['streamId'], started['streamId']);
  assert.deepEqual(resumed.slice(1, 3).map((event) => event['chunk']), chunks.slice(1));
  assert.equal(resumed[3]?.['end']?.['textSha256'], end['textSha256']);
});

test('a refused resume prints the status code and message', async () => {
  const failure = await bufCurl('/tokenrelay.v1.Relay/Stream', { resume: { resume_token: 'v1.bogus', last_seq: 0 } }).then(
    () => assert.fail('buf curl succeeded'),
    (error: unknown) => error as { code: number; stderr: string },
  );
  assert.notEqual(failure.code, 0);
  assert.match(failure.stderr, /permission_denied/i);
  assert.match(failure.stderr, /resume\.resume_token/);
});

/** The README's buf curl command (the second sh block of its grpcurl
 * section) and what it shows that command printing. */
function readmeBufCommand(): { argv: string[]; expected: string } {
  const readme = readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
  const section = (readme.split('## A grpcurl session')[1] ?? '').split('\n## ')[0] ?? '';
  const blocks = [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((match) => match[1] ?? '');
  const block = blocks.find((text) => text.includes('buf curl'));
  assert.ok(block !== undefined, 'the README shows no buf curl command');
  const lines = block.split('\n');
  const first = lines.findIndex((line) => line.startsWith('$ '));
  let command = (lines[first] ?? '').slice(2);
  let next = first + 1;
  while (command.endsWith('\\')) {
    command = `${command.slice(0, -1).trimEnd()} ${(lines[next] ?? '').trim()}`;
    next += 1;
  }
  return { argv: shellWords(command), expected: lines.slice(next).join('\n').trim() };
}

/** Words of a shell command line with single-quoted parts (all the README uses). */
function shellWords(command: string): string[] {
  const words: string[] = [];
  for (const match of command.matchAll(/'([^']*)'|(\S+)/g)) {
    words.push(match[1] ?? match[2] ?? '');
  }
  return words;
}

test('the README\u2019s buf curl command prints what the README shows', async () => {
  const { argv, expected } = readmeBufCommand();
  assert.equal(argv[0], 'clients/node/node_modules/.bin/buf');
  const args = argv.slice(1).map((arg) => arg.replace('http://localhost:50051', `http://${gateway.address}`));
  const { stdout } = await run(BUF, args, { env: { ...process.env, BUF_CACHE_DIR: cacheDir } });
  assert.deepEqual(JSON.parse(stdout), JSON.parse(expected));
});
