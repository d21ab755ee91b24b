/** The test proxy really resets: the peer sees ECONNRESET, not an orderly close. */
import { strict as assert } from 'node:assert';
import * as net from 'node:net';
import { after, before, test } from 'node:test';

import { FaultProxy } from './support/faultProxy';

let echo: net.Server;
let echoAddress: string;

before(async () => {
  echo = net.createServer((socket) => {
    socket.on('error', () => undefined);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => echo.listen(0, '127.0.0.1', resolve));
  const bound = echo.address() as net.AddressInfo;
  echoAddress = `127.0.0.1:${bound.port}`;
});

after(async () => {
  await new Promise<void>((resolve) => echo.close(() => resolve()));
});

function connect(address: string): Promise<net.Socket> {
  const [host, port] = address.split(':');
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), host, () => resolve(socket));
    socket.once('error', reject);
  });
}

function ended(socket: net.Socket): Promise<string> {
  return new Promise((resolve) => {
    socket.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
    socket.once('end', () => resolve('end'));
  });
}

function echoed(socket: net.Socket, text: string): Promise<string> {
  return new Promise((resolve) => {
    socket.once('data', (data) => resolve(data.toString()));
    socket.write(text);
  });
}

test('it forwards, and cutAll resets both sides of every connection', async () => {
  const proxy = await FaultProxy.for(echoAddress);
  try {
    const socket = await connect(proxy.address);
    assert.equal(await echoed(socket, 'ping'), 'ping');
    const outcome = ended(socket);
    assert.equal(proxy.cutAll(), 1);
    assert.equal(await outcome, 'ECONNRESET');
    assert.equal(proxy.connectionsCut, 1);
  } finally {
    await proxy.close();
  }
});

test('with refuseNew a new connection is reset at once, and accepted again after', async () => {
  const proxy = await FaultProxy.for(echoAddress);
  try {
    proxy.refuseNew = true;
    // The reset may come before or after the client saw its connect complete.
    const outcome = await connect(proxy.address).then(ended, (error: NodeJS.ErrnoException) => error.code);
    assert.equal(outcome, 'ECONNRESET');
    proxy.refuseNew = false;
    const socket = await connect(proxy.address);
    assert.equal(await echoed(socket, 'again'), 'again');
    socket.destroy();
    assert.equal(proxy.connectionsAccepted, 2);
  } finally {
    await proxy.close();
  }
});
