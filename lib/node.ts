// Wiring of one server: bind the port -> lock the data directory -> recover the state -> serve.
// Connections that arrive while recovering wait and are served once recovery is done. Shutdown
// is orderly: stop accepting, let in-flight writes finish and their replies go out, close the
// log, release the lock.

import path from 'node:path'
import net from 'node:net'
import type { Config } from './config.ts'
import { Store } from './storage/store.ts'
import { lockDataDir } from './storage/lock.ts'
import { Committer } from './committer.ts'
import { Dispatcher } from './dispatcher.ts'
import { ChatServer } from './server.ts'
import { errors } from './errors.ts'
import { limits } from './limits.ts'
import type { ChatState } from './state.ts'
import type { LogFn } from './logger.ts'
import type { FileOps } from './storage/files.ts'

export interface RunningNode {
  address: { host: string, port: number }
  shutdown: (reason: string) => Promise<void>
}

export interface NodeOptions {
  log: LogFn
  files?: FileOps
  onFatal: (e: Error) => void
}

export async function startNode (config: Config, opts: NodeOptions): Promise<RunningNode> {
  const { log } = opts
  const startedAt = Date.now()
  // Bind first so --port 0 can name the data directory after the port it got; hold connections
  // until the state is recovered.
  const early: net.Socket[] = []
  let chat: ChatServer | null = null
  const listener = net.createServer({ noDelay: true, pauseOnConnect: true }, socket => {
    if (chat) chat.handle(resumed(socket))
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
  const nodeName = `${config.host}:${address.port}`
  const dir = config.data ?? path.resolve('data', String(address.port))

  let release: () => Promise<void>
  try {
    release = await lockDataDir(dir, e => opts.onFatal(new Error(`lost the lock on ${dir}: ${e.message}`)))
  } catch (e) {
    listener.close()
    throw e
  }

  let store: Store
  let state: ChatState
  try {
    store = new Store({
      dir,
      files: opts.files,
      warn: (msg, f) => log('warn', msg, f),
      info: (msg, f) => log('info', msg, f),
      snapshotEveryRecords: config.snapshotEveryRecords,
      snapshotEveryBytes: config.snapshotEveryBytes
    })
    const t0 = Date.now()
    const recovered = store.recover()
    state = recovered.state
    log('info', 'recovered', { dir, index: state.index, snapshotIndex: recovered.snapshotIndex, replayed: recovered.replayed, truncatedBytes: recovered.truncatedBytes, ms: Date.now() - t0 })
  } catch (e) {
    listener.close()
    await release()
    throw e
  }

  let shuttingDown = false
  const dispatcher: Dispatcher = new Dispatcher({
    state: () => state,
    submit: body => committer.submit(body),
    refuse: () => shuttingDown ? errors.shuttingDown() : null,
    status: () => ({
      node: nodeName,
      role: 'single',
      epoch: committer.epoch,
      chain: [nodeName],
      primary: nodeName,
      index: state.index,
      digest: state.digest(),
      clients: chat?.clientCount ?? 0,
      sessions: dispatcher.sessionsOnline(),
      uptimeMs: Date.now() - startedAt,
      storage: store.log.failed ? 'failed' : 'ok'
    })
  }, (level, msg, f) => log(level as 'info', msg, f))
  const committer = new Committer(store, state, (r, a) => dispatcher.onApplied(r, a))

  chat = new ChatServer(dispatcher, {
    lineBytesMax: config.lineBytesMax,
    inflightMax: limits.connectionInflightMax,
    outboundBytesMax: limits.connectionOutboundBytesMax
  })
  chat.adopt(listener)
  for (const s of early.splice(0)) chat.handle(resumed(s))
  log('info', 'started', { listen: nodeName, dir, role: 'single', index: state.index })

  let stopping: Promise<void> | null = null
  const shutdown = (reason: string): Promise<void> => {
    if (stopping) return stopping
    shuttingDown = true
    log('info', 'shutting down', { reason })
    stopping = (async () => {
      await chat!.close(limits.shutdownGraceMs)
      await committer.idle()
      store.close()
      await release()
      log('info', 'stopped', { index: state.index })
    })()
    return stopping
  }
  return { address, shutdown }
}

function resumed (socket: net.Socket): net.Socket {
  socket.setNoDelay(true)
  socket.resume()
  return socket
}
