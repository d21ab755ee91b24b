/**
 * A real tokenrelay gateway for the tests: `tokenrelay serve --port 0` from
 * the repository's virtualenv (or $TOKENRELAY_BIN), which prints `port N`
 * on stdout once it listens. Missing binary: the test fails and says how to
 * install it (`make test` installs it).
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';

export const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..', '..');
export const RESUME_SECRET = 'fa0d2290f8c2c29afdffff5d5ca089871cd31da7f5968b638c36919b3002fbd6';

export function tokenrelayBinary(): string {
  const binary = process.env['TOKENRELAY_BIN'] ?? path.join(REPO_ROOT, '.venv', 'bin', 'tokenrelay');
  if (!existsSync(binary)) {
    throw new Error(
      `${binary} not found: run \`make test\` (or set TOKENRELAY_BIN to a tokenrelay command)`,
    );
  }
  return binary;
}

export interface Gateway {
  readonly address: string;
  readonly port: number;
  /** Everything the gateway wrote on stderr (its log), for failure messages. */
  log(): string;
  stop(): Promise<void>;
}

// A failsafe only: a gateway that has not printed its port by then is broken.
const START_TIMEOUT_MS = 30_000;

export async function startGateway(extraArgs: readonly string[] = []): Promise<Gateway> {
  const child: ChildProcessWithoutNullStreams = spawn(
    tokenrelayBinary(),
    [
      'serve',
      '--port',
      '0',
      '--resume-secret',
      RESUME_SECRET,
      '--drain-grace-s',
      '0',
      '--log-level',
      'warning',
      ...extraArgs,
    ],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (data: string) => {
    stderr += data;
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const port = await new Promise<number>((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`the gateway printed no port within ${START_TIMEOUT_MS} ms:\n${stderr}`));
    }, START_TIMEOUT_MS);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (data: string) => {
      stdout += data;
      const match = /^port (\d+)$/m.exec(stdout);
      if (match?.[1] !== undefined) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`the gateway exited (${code ?? signal}) before it listened:\n${stderr}`));
    });
  });
  return {
    address: `127.0.0.1:${port}`,
    port,
    log: () => stderr,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(killer);
      }
    },
  };
}
