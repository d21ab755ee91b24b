/**
 * A TCP proxy that breaks connections for real (the Node twin of
 * tokenrelay_devtools/netfault.py FaultProxy): `cutAll()` resets both
 * sockets of every open connection (socket.resetAndDestroy: SO_LINGER 0, so
 * the kernel sends a TCP RST and each peer sees "connection reset", as with
 * a network failure); `refuseNew` resets new connections at once (an
 * unreachable gateway, without stopping it).
 */
import * as net from 'node:net';

interface Connection {
  readonly client: net.Socket;
  upstream: net.Socket | null;
  cut: boolean;
}

export class FaultProxy {
  refuseNew = false;
  connectionsAccepted = 0;
  connectionsCut = 0;
  private readonly connections = new Set<Connection>();
  private server: net.Server | null = null;

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
  ) {}

  static async for(target: string): Promise<FaultProxy> {
    const separator = target.lastIndexOf(':');
    const proxy = new FaultProxy(target.slice(0, separator), Number(target.slice(separator + 1)));
    await proxy.start();
    return proxy;
  }

  get address(): string {
    const bound = this.server?.address();
    if (bound === null || bound === undefined || typeof bound === 'string') {
      throw new Error('the proxy is not started');
    }
    return `127.0.0.1:${bound.port}`;
  }

  get openConnections(): number {
    return this.connections.size;
  }

  async start(): Promise<void> {
    const server = net.createServer((client) => this.serve(client));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    this.server = server;
  }

  /** Reset every open connection (both sides); return how many. */
  cutAll(): number {
    const open = [...this.connections].filter((connection) => !connection.cut);
    for (const connection of open) {
      reset(connection);
    }
    this.connectionsCut += open.length;
    return open.length;
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const connection of this.connections) {
      reset(connection);
    }
    if (server !== null) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  }

  private serve(client: net.Socket): void {
    this.connectionsAccepted += 1;
    const connection: Connection = { client, upstream: null, cut: false };
    client.on('error', () => reset(connection));
    if (this.refuseNew || this.server === null) {
      reset(connection);
      return;
    }
    this.connections.add(connection);
    client.once('close', () => {
      this.connections.delete(connection);
      connection.upstream?.destroy();
    });
    const upstream = net.connect(this.targetPort, this.targetHost);
    connection.upstream = upstream;
    upstream.on('error', () => reset(connection));
    upstream.once('close', () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  }
}

function reset(connection: Connection): void {
  connection.cut = true;
  for (const socket of [connection.client, connection.upstream]) {
    if (socket !== null && !socket.destroyed) {
      // resetAndDestroy needs a connected TCP handle; a socket still
      // connecting is destroyed plainly (its peer never saw it).
      if (socket.connecting) {
        socket.destroy();
      } else {
        socket.resetAndDestroy();
      }
    }
  }
}
