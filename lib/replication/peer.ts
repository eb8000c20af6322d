// Peer links: authenticated JSON-lines connections between chain members, on the same port
// clients use. A peer connection opens with {"op":"peer_hello"} and then a mutual HMAC
// challenge, so neither side talks replication to anything that cannot prove the shared secret:
//
//   connector -> {"op":"peer_hello","from":"h:p","nonce":Nc}
//   acceptor  -> {"t":"challenge","nonce":Na,"proof":HMAC(secret, "acceptor\n"+Nc+"\n"+Na+"\n"+acceptor)}
//   connector -> {"t":"auth","proof":HMAC(secret, "connector\n"+Na+"\n"+Nc+"\n"+from)}
//   acceptor  -> {"t":"welcome"} (or {"t":"denied"} and the connection closes)
//
// Both nonces are fresh random values, so a recorded handshake or message cannot be replayed on
// another connection. Without a secret, the HMAC key is empty and only loopback peers are
// accepted (the server warns about this at start).

import net from 'node:net'
import { EventEmitter } from 'node:events'
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import split2 from 'split2'

export const peerLineBytesMax = 64 * 1024 * 1024

export type PeerMessage = { t: string, [field: string]: unknown }

function proof (secret: string, parts: string[]): string {
  return createHmac('sha256', secret).update(parts.join('\n')).digest('base64')
}

function proofMatches (secret: string, parts: string[], given: unknown): boolean {
  if (typeof given !== 'string') return false
  const want = Buffer.from(proof(secret, parts))
  const got = Buffer.from(given)
  return want.length === got.length && timingSafeEqual(want, got)
}

export function isLoopback (address: string | undefined): boolean {
  if (!address) return false
  const a = address.startsWith('::ffff:') ? address.slice(7) : address
  return a === '::1' || /^127\.\d+\.\d+\.\d+$/.test(a)
}

// A JSON-lines connection to a peer. Emits 'message' for each parsed line and 'close' once.
export class PeerSocket extends EventEmitter {
  lastHeard = Date.now()
  private closedFlag = false

  constructor (readonly socket: net.Socket, readonly remote: string) {
    super()
    socket.setNoDelay(true)
    const lines = socket.pipe(split2(/\r?\n/, { maxLength: peerLineBytesMax }))
    lines.on('data', (line: string) => {
      if (this.closedFlag || line === '') return
      this.lastHeard = Date.now()
      let msg: unknown
      try {
        msg = JSON.parse(line)
      } catch {
        this.close()
        return
      }
      if (msg === null || typeof msg !== 'object' || typeof (msg as PeerMessage).t !== 'string') {
        this.close()
        return
      }
      this.emit('message', msg as PeerMessage)
    })
    lines.on('error', () => this.close())
    socket.on('error', () => this.close())
    socket.on('close', () => this.close())
  }

  get closed (): boolean { return this.closedFlag }

  // Queue a message. Returns false when the socket's buffer is full: wait for drained().
  send (msg: PeerMessage | string): boolean {
    if (this.closedFlag) return false
    return this.socket.write(typeof msg === 'string' ? msg : JSON.stringify(msg) + '\n')
  }

  drained (): Promise<void> {
    if (this.closedFlag || !this.socket.writableNeedDrain) return Promise.resolve()
    return new Promise(resolve => {
      const done = (): void => {
        this.socket.off('drain', done)
        this.off('close', done)
        resolve()
      }
      this.socket.on('drain', done)
      this.on('close', done)
    })
  }

  close (): void {
    if (this.closedFlag) return
    this.closedFlag = true
    this.socket.destroy()
    this.emit('close')
  }
}

function readLine (socket: net.Socket, timeoutMs: number): Promise<PeerMessage> {
  return new Promise((resolve, reject) => {
    let buf = ''
    const timer = setTimeout(() => finish(new Error('peer handshake timed out')), timeoutMs)
    const onData = (d: Buffer): void => {
      buf += d.toString('utf8')
      const nl = buf.indexOf('\n')
      if (nl < 0) {
        if (buf.length > 4096) finish(new Error('peer handshake line too long'))
        return
      }
      const rest = buf.slice(nl + 1)
      socket.pause()
      if (rest.length > 0) socket.unshift(Buffer.from(rest, 'utf8'))
      try {
        finish(null, JSON.parse(buf.slice(0, nl)))
      } catch {
        finish(new Error('peer handshake: bad JSON'))
      }
    }
    const onClose = (): void => finish(new Error('peer closed during handshake'))
    const finish = (err: Error | null, msg?: PeerMessage): void => {
      clearTimeout(timer)
      socket.off('data', onData)
      socket.off('close', onClose)
      socket.off('error', onClose)
      if (err) reject(err)
      else resolve(msg!)
    }
    socket.on('data', onData)
    socket.on('close', onClose)
    socket.on('error', onClose)
    socket.resume()
  })
}

// Connect to a peer and authenticate both ways. Rejects if the peer is down, does not answer
// within timeoutMs, or fails the challenge.
export async function connectPeer (me: string, addr: string, secret: string, timeoutMs: number): Promise<PeerSocket> {
  const [host, portText] = splitAddr(addr)
  const socket = net.connect(Number(portText), host)
  socket.setNoDelay(true)
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`connect to ${addr} timed out`)), timeoutMs)
      socket.once('connect', () => { clearTimeout(timer); resolve() })
      socket.once('error', (e) => { clearTimeout(timer); reject(e) })
    })
    const nonce = randomBytes(18).toString('base64')
    socket.write(JSON.stringify({ op: 'peer_hello', from: me, nonce }) + '\n')
    const challenge = await readLine(socket, timeoutMs)
    if (challenge.t !== 'challenge' || typeof challenge.nonce !== 'string' || !proofMatches(secret, ['acceptor', nonce, challenge.nonce, addr], challenge.proof)) {
      throw new Error(`peer ${addr} failed authentication (is the secret the same on every member?)`)
    }
    socket.write(JSON.stringify({ t: 'auth', proof: proof(secret, ['connector', challenge.nonce, nonce, me]) }) + '\n')
    const answer = await readLine(socket, timeoutMs)
    if (answer.t !== 'welcome') throw new Error(`peer ${addr} refused us: ${String(answer.why ?? answer.t)}`)
    return new PeerSocket(socket, addr)
  } catch (e) {
    socket.destroy()
    throw e
  }
}

// Accept a peer connection whose first line (peer_hello) was already read. Resolves with the
// authenticated link, or null after telling the other side it was denied.
export async function acceptPeer (me: string, socket: net.Socket, hello: Record<string, unknown>, secret: string, requireLoopback: boolean, timeoutMs: number): Promise<PeerSocket | null> {
  const deny = (why: string): null => {
    socket.end(JSON.stringify({ t: 'denied', why }) + '\n')
    setTimeout(() => socket.destroy(), 1000).unref()
    return null
  }
  if (requireLoopback && !isLoopback(socket.remoteAddress)) return deny('peer links without a secret are accepted only from loopback')
  if (typeof hello.from !== 'string' || typeof hello.nonce !== 'string' || hello.nonce.length > 64) return deny('bad peer_hello')
  const nonce = randomBytes(18).toString('base64')
  socket.write(JSON.stringify({ t: 'challenge', nonce, proof: proof(secret, ['acceptor', hello.nonce, nonce, me]) }) + '\n')
  let auth: PeerMessage
  try {
    auth = await readLine(socket, timeoutMs)
  } catch {
    socket.destroy()
    return null
  }
  if (auth.t !== 'auth' || !proofMatches(secret, ['connector', nonce, hello.nonce, hello.from], auth.proof)) return deny('authentication failed')
  socket.write(JSON.stringify({ t: 'welcome' }) + '\n')
  return new PeerSocket(socket, hello.from)
}

export function splitAddr (addr: string): [string, string] {
  const k = addr.lastIndexOf(':')
  return [addr.slice(0, k).replace(/^\[|\]$/g, ''), addr.slice(k + 1)]
}
