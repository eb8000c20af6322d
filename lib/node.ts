// Wiring of one server: bind the port -> lock the data directory -> recover the state -> serve,
// alone or as a chain member. Connections that arrive while recovering wait and are served once
// recovery is done. Each connection's first bytes tell a peer (`{"op":"peer_hello"`) from a
// client. Shutdown is orderly: stop accepting, let in-flight writes finish and their replies go
// out, close the log, release the lock.

import path from 'node:path'
import net from 'node:net'
import { type Config, heapShare } from './config.ts'
import { Store } from './storage/store.ts'
import { lockDataDir } from './storage/lock.ts'
import { Committer } from './committer.ts'
import { Dispatcher, type Host } from './dispatcher.ts'
import { ChatServer } from './server.ts'
import { errors } from './errors.ts'
import { limits } from './limits.ts'
import type { LogFn } from './logger.ts'
import type { FileOps } from './storage/files.ts'
import { MetaStore } from './replication/meta.ts'
import { ChainNode } from './replication/chain-node.ts'
import { withFsyncFailure, helperReads } from './fault-hooks.ts'
import { realFiles } from './storage/files.ts'

export interface RunningNode {
  address: { host: string, port: number }
  shutdown: (reason: string) => Promise<void>
}

export interface NodeOptions {
  log: LogFn
  files?: FileOps
  onFatal: (e: Error) => void
  code?: string // where the running code was loaded from, for the log ('lib' or 'build')
}

const peerHelloPrefix = '{"op":"peer_hello"'

export async function startNode (config: Config, opts: NodeOptions): Promise<RunningNode> {
  const { log } = opts
  const startedAt = Date.now()
  // Bind first so --port 0 can name the data directory after the port it got; hold connections
  // until the state is recovered.
  const early: net.Socket[] = []
  let accept: ((socket: net.Socket) => void) | null = null
  const listener = net.createServer({ noDelay: true, pauseOnConnect: true }, socket => {
    if (accept) accept(socket)
    else early.push(socket)
  })
  listener.maxConnections = limits.connectionsMax
  const address = await new Promise<{ host: string, port: number }>((resolve, reject) => {
    listener.once('error', reject)
    listener.listen(config.port, config.host, () => {
      listener.removeListener('error', reject)
      const a = listener.address() as net.AddressInfo
      resolve({ host: a.address, port: a.port })
    })
  })
  const nodeName = config.peers ? config.me : `${config.host}:${address.port}`
  const dir = config.data ?? path.resolve('data', String(address.port))

  let release: () => Promise<void>
  try {
    release = await lockDataDir(dir, e => opts.onFatal(new Error(`lost the lock on ${dir}: ${e.message}`)))
  } catch (e) {
    listener.close()
    throw e
  }

  let store: Store
  let recovered: ReturnType<Store['recover']>
  let meta: ReturnType<MetaStore['load']> = null
  try {
    store = new Store({
      dir,
      files: withFsyncFailure(opts.files ?? realFiles),
      warn: (msg, f) => log('warn', msg, f),
      info: (msg, f) => log('info', msg, f),
      snapshotEveryRecords: config.snapshotEveryRecords,
      snapshotEveryBytes: config.snapshotEveryBytes,
      snapshotGrowthPercent: config.snapshotGrowthPercent,
      segmentBytes: config.segmentBytes,
      backgroundSnapshots: true,
      preallocateBytes: limits.logPreallocateBytes,
      ...helperReads()
    })
    // A chain member applies only what it knows was committed; the rest waits for the chain.
    if (config.peers !== null || config.join !== null) meta = new MetaStore(dir, opts.files).load()
    const t0 = Date.now()
    recovered = store.recover(meta ? meta.commit : undefined)
    log('info', 'recovered', { dir, index: recovered.state.index, lastIndex: store.log.lastIndex, snapshotIndex: recovered.snapshotIndex, replayed: recovered.replayed, truncatedBytes: recovered.truncatedBytes, packedMailboxes: recovered.state.deferredMailboxes, checksums: recovered.checksums, ms: Date.now() - t0 })
  } catch (e) {
    listener.close()
    await release()
    throw e
  }

  let shuttingDown = false
  let chat: ChatServer | null = null
  let chain: ChainNode | null = null
  let single: Committer | null = null
  const common = (): Record<string, unknown> => {
    const state = chain ? chain.state : recovered.state
    return {
      node: nodeName,
      // null while messages a start left packed are not decoded yet (a status asked without
      // waiting for the digest: see Dispatcher)
      digest: state.digestPending ? null : state.digest(),
      clients: chat?.clientCount ?? 0,
      sessions: dispatcher.sessionsOnline(),
      uptimeMs: Date.now() - startedAt,
      stored: state.storedBytes, // what the quota counts (protocol.md, "Quota")
      quota: config.quotaBytes,
      mailboxQuota: config.mailboxQuotaBytes,
      fullestMailbox: state.fullestMailbox, // { user, bytes }, counted as the quotas count
      log: store.log.appendStats(),
      storage: store.log.failed ? 'failed' : chain?.storageFailing === true ? 'failing' : 'ok'
    }
  }
  const chainMode = config.peers !== null || config.join !== null
  const host: Host = !chainMode
    ? {
        state: () => recovered.state,
        submit: body => single!.submit(body),
        refuse: () => shuttingDown ? errors.shuttingDown() : null,
        status: () => ({ role: 'single', epoch: 0, chain: [nodeName], primary: nodeName, index: recovered.state.index, lastIndex: store.log.lastIndex, ...common() })
      }
    : {
        state: () => chain!.state,
        submit: body => chain!.submit(body),
        refuse: () => shuttingDown ? errors.shuttingDown() : chain!.refuse(),
        status: () => ({ ...chain!.status(), ...common() })
      }
  const dispatcher: Dispatcher = new Dispatcher(host, (level, msg, f) => log(level as 'info', msg, f))
  chat = new ChatServer(dispatcher, {
    lineBytesMax: config.lineBytesMax,
    inflightMax: limits.connectionInflightMax,
    outboundBytesMax: limits.connectionOutboundBytesMax,
    outboundBytesTotalMax: heapShare(limits.outboundHeapShare),
    partialBytesTotalMax: heapShare(limits.partialHeapShare)
  }, (msg, fields) => log('warn', msg, fields))
  chat.adopt(listener)

  if (chainMode) {
    if (config.secret === null) log('warn', 'no peer secret configured: peer links are accepted from loopback addresses only (use --secret-file or CHAINCHAT_SECRET)')
    chain = new ChainNode({
      me: config.me,
      peers: config.peers ?? [],
      join: config.join,
      secret: config.secret ?? '',
      requireLoopback: config.secret === null,
      heartbeatMs: config.heartbeatMs,
      failureTimeoutMs: config.failureTimeoutMs,
      minChain: config.minChain,
      forceStart: config.forceStart,
      quotaBytes: config.quotaBytes,
      mailboxQuotaBytes: config.mailboxQuotaBytes,
      store,
      log,
      onApplied: (r, a) => dispatcher.onApplied(r, a),
      dropClients: () => chat!.dropClients(),
      onFatal: opts.onFatal
    }, recovered.state, recovered.unapplied, meta)
  } else {
    single = new Committer(store, recovered.state, 0, (r, a) => dispatcher.onApplied(r, a))
    single.quotaBytes = config.quotaBytes
    single.mailboxQuotaBytes = config.mailboxQuotaBytes
  }

  accept = socket => route(socket)
  const route = (socket: net.Socket): void => {
    socket.setNoDelay(true)
    let buf = Buffer.alloc(0)
    const onData = (d: Buffer): void => {
      buf = Buffer.concat([buf, d])
      const text = buf.toString('utf8', 0, Math.min(buf.length, peerHelloPrefix.length))
      const isPeer = text === peerHelloPrefix
      if (!isPeer && (buf.length >= peerHelloPrefix.length || !peerHelloPrefix.startsWith(text) || buf.includes(10))) {
        socket.off('data', onData)
        socket.pause()
        socket.unshift(buf)
        if (shuttingDown) socket.destroy()
        else chat!.handle(socket)
        return
      }
      const nl = buf.indexOf(10)
      if (isPeer && nl >= 0) {
        socket.off('data', onData)
        socket.pause()
        if (nl + 1 < buf.length) socket.unshift(buf.subarray(nl + 1))
        let hello: Record<string, unknown> | null = null
        try { hello = JSON.parse(buf.subarray(0, nl).toString('utf8')) } catch { /* refused below */ }
        if (!chain || !hello || shuttingDown) {
          socket.end(JSON.stringify({ t: 'denied', why: chain ? 'bad peer_hello' : 'this server is not a chain member' }) + '\n')
          return
        }
        chain.acceptPeer(socket, hello).catch(e => log('warn', 'peer handshake failed', { error: String(e) }))
      } else if (buf.length > 4096) socket.destroy()
    }
    socket.on('data', onData)
    socket.on('error', () => socket.destroy())
    socket.resume()
  }
  for (const s of early.splice(0)) route(s)
  chain?.start()
  // A start from a snapshot leaves each mailbox packed until it is first used (state.ts,
  // Mailbox.defer), and replaying the log leaves the messages of its sends packed
  // (ChatState.replay). Decode them a few milliseconds at a time between requests, so that no
  // request waits on a whole mailbox later, and the snapshot's and the log's buffers are let go.
  const loaded = recovered.state
  if (loaded.undecodedWork) {
    const since = Date.now()
    const mailboxes = loaded.deferredMailboxes
    const warm = (): void => {
      if (shuttingDown || (chain !== null && chain.state !== loaded)) return
      if (loaded.warmSome(2)) {
        setImmediate(warm)
        return
      }
      log('info', 'mailboxes decoded', { mailboxes, ms: Date.now() - since })
      if (loaded.snapshotMismatch !== null) log('error', 'snapshot digest mismatch', { detail: loaded.snapshotMismatch })
      // A snapshot that came due meanwhile waited for the decoding (Store.maybeSnapshot), and
      // would otherwise wait for the next write too: after a replay of a long log, one is due
      // from the first write on.
      store.maybeSnapshot(loaded)
    }
    setImmediate(warm)
  }
  log('info', 'started', { listen: nodeName, dir, mode: chain ? 'chain' : 'single', index: recovered.state.index, peers: config.peers, join: config.join, code: opts.code })

  let stopping: Promise<void> | null = null
  const shutdown = (reason: string): Promise<void> => {
    if (stopping) return stopping
    shuttingDown = true
    log('info', 'shutting down', { reason })
    stopping = (async () => {
      await chat!.close(limits.shutdownGraceMs)
      await Promise.race([Promise.all([single?.idle(), chain?.idle()]), new Promise(resolve => setTimeout(resolve, limits.shutdownGraceMs).unref())])
      chain?.stop()
      store.close()
      await release()
      log('info', 'stopped', { index: (chain ? chain.state : recovered.state).index })
    })()
    return stopping
  }
  return { address, shutdown }
}
