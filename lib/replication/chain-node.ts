// A member of a replicated chain (protocol.md, "Replication"; README, "Fault model").
//
// Data flows client -> primary -> backup -> ... -> tail. The primary stamps a record and forwards
// it; each backup persists it (fsync) and then forwards it; the tail acknowledges; every member
// acknowledges upstream the highest index persisted by itself and everything after it; when the
// primary hears back, it persists, applies and answers (committer.ts). The primary's state is
// therefore always committed state, and a backup may hold records the primary never committed.
// Backups apply a record only once the primary reports it committed (the `commit` index carried
// on every append and heartbeat).
//
// Configurations are numbered by epoch. A member persists a configuration (meta.ts) before it
// acts on it, and accepts the replication stream only from the predecessor its configuration
// names, at that epoch. Every reconfiguration is made by the primary, except taking over from a
// primary that died, which the first surviving member makes. On every new link the successor
// discards what it has not applied and the predecessor resends from there (a snapshot first if
// its log no longer reaches back that far), so uncommitted records are either committed by the
// new configuration or dropped, never left half-known.

import type net from 'node:net'
import { Committer } from '../committer.ts'
import type { Store } from '../storage/store.ts'
import { encodeRecordFrame } from '../storage/framing.ts'
import { encodeInPieces, type ChatState, type Applied, type SnapshotChunk } from '../state.ts'
import type { LogRecord, RecordBody } from '../records.ts'
import { ChatError, errors } from '../errors.ts'
import type { LogFn } from '../logger.ts'
import { MetaStore, sameConfig, type ChainConfig, type Meta } from './meta.ts'
import { PeerSocket, connectPeer, acceptPeer, peerLineBytesMax, type PeerMessage } from './peer.ts'
import { crashPoint } from '../fault-hooks.ts'

export type Role = 'primary' | 'backup' | 'joining' | 'waiting' | 'retired'

export interface ChainOptions {
  me: string
  peers: string[] // every member of the initial chain, this one included, in chain order
  join: string | null // a running member to join through (a server not in --peers)
  secret: string
  requireLoopback: boolean
  heartbeatMs: number
  failureTimeoutMs: number
  minChain: number
  forceStart: boolean
  quotaBytes?: number // see Committer.submit; none if absent
  mailboxQuotaBytes?: number // the same, for one mailbox
  store: Store
  log: LogFn
  // Carry out a record's effects (pushes) on the primary.
  onApplied: (record: LogRecord, applied: Applied) => void
  // Close every client connection (after losing the primary role: outcomes are unknown).
  dropClients: () => void
  // After a failed fsync the member cannot trust its own disk: it stops for good.
  onFatal: (e: Error) => void
}

interface PeerInfo {
  node: string
  role: Role
  epoch: number
  chain: string[]
  learner: string | null
  applied: number
  last: number
  lastEpoch: number
  storage?: 'ok' | 'failing' // failing: its last write was refused (a full disk)
}

const sleep = (ms: number): Promise<void> => new Promise(resolve => setTimeout(resolve, ms))

// The most recent durable records, in memory, so that forwarding and short resends never read
// the log files. Older records are read from disk.
class RecentRecords {
  private records: LogRecord[] = []
  private start = 0 // position of the first live record in `records`
  constructor (private readonly keep: number) {}

  push (r: LogRecord): void {
    const last = this.records.length > this.start ? this.records[this.records.length - 1] : null
    if (last && r.i <= last.i) return // already held (a new primary applying what it inherited)
    if (last && r.i !== last.i + 1) this.clear()
    this.records.push(r)
    if (this.records.length - this.start > this.keep) this.start++
    if (this.start > this.keep) {
      this.records = this.records.slice(this.start)
      this.start = 0
    }
  }

  // Up to max records from `from` through `upTo`, or null if `from` is not held here.
  range (from: number, upTo: number, max: number): LogRecord[] | null {
    if (this.records.length === this.start) return null
    const first = this.records[this.start].i
    const pos = this.start + from - first
    if (from < first || pos >= this.records.length) return null
    const end = Math.min(this.records.length, pos + max, pos + (upTo - from) + 1)
    return this.records.slice(pos, Math.max(pos, end))
  }

  truncateAfter (index: number): void {
    while (this.records.length > this.start && this.records[this.records.length - 1].i > index) this.records.pop()
  }

  clear (): void {
    this.records = []
    this.start = 0
  }
}

// The link to our successor (or to a learner catching up behind the tail).
class SuccessorLink {
  acked = 0 // highest index the successor (and everything after it) has persisted
  private next = 0 // next index to send
  private disk: { iter: Generator<LogRecord[]>, next: number } | null = null // an ongoing read of older records
  private pumping = false
  private ready = false
  private bulk = false // a snapshot was sent and not yet acknowledged
  private timer: NodeJS.Timeout | null = null
  closed = false

  constructor (private readonly node: ChainNode, readonly target: string, readonly learner: boolean, private readonly peer: PeerSocket) {
    peer.on('message', (m: PeerMessage) => this.onMessage(m))
    peer.on('close', () => this.fail('link closed'))
    this.timer = setInterval(() => this.tick(), node.opts.heartbeatMs)
  }

  start (cfg: ChainConfig, commit: number): void {
    this.peer.send({ t: 'sync', epoch: cfg.epoch, chain: cfg.chain, learner: cfg.learner, commit })
  }

  private tick (): void {
    // A learner may be busy installing a large snapshot: it is not in the write path, so it
    // gets a longer leash.
    // So may a member receiving a snapshot, until it acknowledges again.
    const limit = this.node.opts.failureTimeoutMs * (this.learner || this.bulk ? 10 : 1)
    if (Date.now() - this.peer.lastHeard > limit) {
      this.fail('heartbeats missed')
      return
    }
    if (this.ready) this.peer.send({ t: 'hb', epoch: this.node.epoch, commit: this.node.commitIndex })
  }

  private onMessage (m: PeerMessage): void {
    switch (m.t) {
      case 'synced':
        crashPoint('before-resend')
        this.ready = true
        this.next = Number(m.applied) + 1
        this.acked = Number(m.applied)
        this.pump()
        return
      case 'ack':
        this.bulk = false
        // A learner's acks are also its heartbeat replies: each one may show it caught up, even
        // when no writes are flowing.
        if (Number(m.index) > this.acked || this.learner) {
          this.acked = Math.max(this.acked, Number(m.index))
          this.node.onSuccessorAck(this)
        }
        return
      case 'reject':
        this.node.onRejected(this.target, m)
        this.close()
        return
      case 'suspect':
      case 'promote':
        this.node.onReport(m)
    }
  }

  // Send everything from `next` up to what this member can offer, respecting backpressure.
  pump (): void {
    if (!this.ready || this.pumping || this.closed) return
    this.pumping = true
    this.pumpLoop().catch(e => this.fail(`resend failed: ${String(e)}`)).finally(() => { this.pumping = false })
  }

  private async pumpLoop (): Promise<void> {
    for (;;) {
      if (this.closed) return
      const upTo = this.node.offerUpTo()
      if (this.next > upTo) return
      if (this.next < this.node.store.log.firstIndex && this.next <= this.node.state.index) {
        await this.sendSnapshot()
        continue
      }
      let records = this.node.recordsFrom(this.next, upTo)
      if (records === null) records = this.readDisk(upTo)
      if (records.length === 0) return
      for (let k = 0; k < records.length; k += 500) {
        const part = records.slice(k, k + 500)
        this.peer.send({ t: 'append', epoch: this.node.epoch, commit: this.node.commitIndex, records: part })
        this.next = part[part.length - 1].i + 1
        await this.peer.drained()
        if (this.closed) return
      }
    }
  }

  // Older records, read from the log files one segment at a time; the read continues where the
  // previous one stopped, so catching up reads each file once.
  private readDisk (upTo: number): LogRecord[] {
    if (!this.disk || this.disk.next !== this.next) this.disk = { iter: this.node.store.log.readFrom(this.next, 1000), next: this.next }
    const step = this.disk.iter.next()
    if (step.done) {
      this.disk = null
      return []
    }
    const out = step.value.filter(r => r.i >= this.next && r.i <= upTo)
    this.disk.next = out.length > 0 ? out[out.length - 1].i + 1 : this.next
    return out
  }

  private async sendSnapshot (): Promise<void> {
    const st = this.node.state
    this.node.opts.log('info', 'sending a snapshot to catch a peer up', { peer: this.target, index: st.index })
    this.bulk = true
    // Each chunk is encoded once, to size the batches and to send them.
    const batches = [...snapshotBatches(st.snapshotChunks())]
    for (let k = 0; k < batches.length; k++) {
      this.peer.send(`{"t":"snapshot","epoch":${this.node.epoch},"chunks":[${batches[k].join(',')}],"done":${k === batches.length - 1}}\n`)
      await this.peer.drained()
    }
    this.next = st.index + 1
  }

  fail (why: string): void {
    if (this.closed) return
    this.close()
    this.node.onSuccessorFailed(this, why)
  }

  close (): void {
    if (this.closed) return
    this.closed = true
    if (this.timer) clearInterval(this.timer)
    this.peer.close()
  }
}

export class ChainNode {
  role: Role = 'waiting'
  state: ChatState
  readonly store: Store
  readonly opts: ChainOptions
  private readonly metaStore: MetaStore
  private meta: Meta
  private committer: Committer | null = null
  private unapplied: LogRecord[] // durable here, not yet known to be committed
  private readonly recent = new RecentRecords(20_000)
  private lastEpoch: number // epoch of the last record in the log
  private succ: SuccessorLink | null = null
  private pred: PeerSocket | null = null
  private predName: string | null = null
  private predTimer: NodeJS.Timeout | null = null
  private receiving: { records: LogRecord[], frames: Buffer[] } | null = null
  private snapshotChunks: Array<Record<string, unknown>> = []
  private discovering = false
  private stopped = false
  private commitSavedAt = 0
  private reconfiguring = false
  private ackedUp = 0 // the last index acknowledged to the current predecessor
  private progressLoggedAt = 0
  private storageFailures = 0 // writes refused in a row (a full disk); 0 once one succeeds
  private storageRetryAt = 0 // after a refused write, do not ask to join before this time
  // Records up to here are known to match the current predecessor's log: applied ones, and those
  // it sent (or re-sent) in this stream. Only these are acknowledged, forwarded and applied.
  private verified = 0
  // This member's log is a prefix of the chain's: it has followed without a break since its
  // first sync after starting, and has not led since. Then a new predecessor that was upstream
  // of it holds everything it holds, and nothing it holds may be thrown away.
  private followingSinceStart = false
  private snapshotInstalledAt = 0
  commitIndex = 0

  constructor (opts: ChainOptions, state: ChatState, unapplied: LogRecord[], meta: Meta | null) {
    this.opts = opts
    this.store = opts.store
    this.state = state
    this.unapplied = unapplied
    this.metaStore = new MetaStore(opts.store.dir, opts.store.files)
    // A fresh member starts from the initial chain at epoch 0, which every fresh member agrees on.
    this.meta = meta ?? { epoch: 0, chain: opts.join ? [] : [...opts.peers], learner: null, commit: state.index }
    this.commitIndex = Math.max(this.meta.commit, state.index)
    if (opts.join && (!meta || meta.retired)) this.role = 'joining'
    const last = unapplied.length > 0 ? unapplied[unapplied.length - 1] : null
    this.lastEpoch = last ? last.e : state.lastEpoch
    for (const r of unapplied) this.recent.push(r)
  }

  get epoch (): number { return this.meta.epoch }
  get chain (): string[] { return this.meta.chain }

  // ---- client-facing -----------------------------------------------------------------------

  // Null when this member may serve clients, else the error they get.
  refuse (): ChatError | null {
    if (this.role === 'primary') {
      if (!this.committer || !this.committer.caughtUp) return errors.unavailable('the new primary is committing what it inherited')
      return null
    }
    if (this.role === 'backup') return errors.notPrimary(this.meta.chain[0] ?? null)
    if (this.role === 'retired') return errors.unavailable('this server was removed from the chain')
    return errors.unavailable(this.role === 'waiting' ? 'this server is waiting for the members that hold the latest state' : 'this server is catching up to join the chain')
  }

  submit (body: RecordBody): Promise<Applied> {
    if (!this.committer) return Promise.reject(errors.unavailable('this server is not the primary'))
    if (this.meta.chain.length < this.opts.minChain) return Promise.reject(errors.unavailable(`fewer than ${this.opts.minChain} members are in the chain (--min-chain)`))
    return this.committer.submit(body)
  }

  status (): Record<string, unknown> {
    return {
      role: this.role,
      epoch: this.meta.epoch,
      chain: this.meta.chain,
      learner: this.meta.learner,
      primary: this.role === 'primary' || this.role === 'backup' ? this.meta.chain[0] ?? null : null,
      index: this.state.index,
      lastIndex: this.lastIndex(),
      commit: this.commitIndex
    }
  }

  // ---- start and discovery -----------------------------------------------------------------

  start (): void {
    this.opts.log('info', 'chain member starting', { epoch: this.meta.epoch, chain: this.meta.chain, index: this.state.index, lastIndex: this.lastIndex() })
    if (this.meta.retired && !this.opts.join) {
      this.setRole('retired', 'removed from the chain by an operator; start with --join to come back')
      return
    }
    if (this.meta.retired) this.meta.retired = false
    this.discover()
  }

  stop (): void {
    this.stopped = true
    this.succ?.close()
    this.pred?.close()
    if (this.predTimer) clearInterval(this.predTimer)
    this.committer?.abandon(errors.shuttingDown())
  }

  async idle (): Promise<void> {
    await this.committer?.idle()
  }

  private lastIndex (): number {
    return this.store.log.lastIndex
  }

  private setRole (role: Role, why: string): void {
    if (this.role === role) return
    this.opts.log('info', 'role change', { from: this.role, to: role, why, epoch: this.meta.epoch, chain: this.meta.chain })
    this.role = role
  }

  // Persist a configuration, then use it: if the write fails (a full disk), nothing changes.
  private saveMeta (cfg: ChainConfig, retired = false): void {
    const meta = { epoch: cfg.epoch, chain: [...cfg.chain], learner: cfg.learner, commit: this.commitIndex, ...(retired ? { retired } : {}) }
    this.metaStore.save(meta)
    this.meta = meta
    this.commitSavedAt = Date.now()
  }

  // Find out whether a chain is running (then join it) or the cluster is starting cold (then
  // lead if this member is sure to hold the latest state, else wait).
  private discover (): void {
    if (this.discovering || this.stopped || this.role === 'retired') return
    this.discovering = true
    this.discoverLoop().catch(e => this.opts.log('error', 'discovery failed', { error: String(e) })).finally(() => { this.discovering = false })
  }

  private others (): string[] {
    const all = new Set([...this.opts.peers, ...this.meta.chain, ...(this.meta.learner ? [this.meta.learner] : []), ...(this.opts.join ? [this.opts.join] : [])])
    all.delete(this.opts.me)
    return [...all]
  }

  private async discoverLoop (): Promise<void> {
    let waitingLogged = false
    while (!this.stopped && (this.role === 'waiting' || this.role === 'joining') && this.pred === null) {
      if (Date.now() < this.storageRetryAt) {
        await sleep(this.storageRetryAt - Date.now())
        continue
      }
      const infos = await this.probeAround()
      if (this.stopped || this.pred !== null || (this.role !== 'waiting' && this.role !== 'joining')) return
      const heads = infos.filter(i => i.role === 'primary').sort((a, b) => b.epoch - a.epoch)
      if (heads.length > 0) {
        // A primary whose chain names us will link to us; otherwise ask it to let us join.
        if (!heads[0].chain.includes(this.opts.me) && await this.askToJoin(heads[0].node)) {
          // The tail links to us shortly; if it never does, ask again.
          await sleep(this.opts.failureTimeoutMs * 5)
          continue
        }
      } else if (this.role === 'waiting') {
        const leader = this.coldStartLeader(infos)
        if (leader === this.opts.me) {
          const known = [this.meta, ...infos]
          const latest = known.reduce((a, b) => b.epoch > a.epoch ? b : a)
          const present = new Set(infos.map(i => i.node))
          const chain = [this.opts.me, ...latest.chain.filter(m => m !== this.opts.me && present.has(m))]
          if (this.opts.forceStart) for (const i of infos) if (!chain.includes(i.node)) chain.push(i.node)
          this.becomePrimary(Math.max(...known.map(k => k.epoch)) + 1, chain, 'cold start: this member holds the latest state')
          return
        }
        if (!waitingLogged) {
          this.opts.log('info', 'waiting for the members of the latest configuration', { present: infos.map(i => i.node), leader })
          waitingLogged = true
        }
      }
      await sleep(Math.max(200, this.opts.failureTimeoutMs / 2))
    }
  }

  // Probe every member we know of, then the members those name (a server joining through one
  // member learns the rest of the chain this way).
  private async probeAround (): Promise<PeerInfo[]> {
    const asked = new Set(this.others())
    const infos = (await Promise.all([...asked].map(a => this.probe(a)))).filter((x): x is PeerInfo => x !== null)
    const more = new Set<string>()
    for (const i of infos) for (const m of [...i.chain, ...(i.learner ? [i.learner] : [])]) if (m !== this.opts.me && !asked.has(m)) more.add(m)
    const extra = (await Promise.all([...more].map(a => this.probe(a)))).filter((x): x is PeerInfo => x !== null)
    return [...infos, ...extra]
  }

  // With no primary running: the member to lead, or null to keep waiting. Only a member of the
  // latest configuration anyone knows may lead, and only with all of that configuration's
  // members present (or when it names one member alone): anything less could lose writes that
  // the last survivors acknowledged. Among them, the longest log wins.
  private coldStartLeader (infos: PeerInfo[]): string | null {
    const mine: PeerInfo = { node: this.opts.me, role: this.role, epoch: this.meta.epoch, chain: this.meta.chain, learner: this.meta.learner, applied: this.state.index, last: this.lastIndex(), lastEpoch: this.lastEpoch }
    const all = [mine, ...infos]
    const latest = all.reduce((a, b) => b.epoch > a.epoch ? b : a)
    const present = new Map(all.map(i => [i.node, i]))
    let candidates: PeerInfo[]
    if (this.opts.forceStart) candidates = all.filter(i => i.epoch === latest.epoch || latest.chain.includes(i.node))
    else {
      if (latest.chain.length === 0 || !latest.chain.every(m => present.has(m))) return null
      candidates = latest.chain.map(m => present.get(m)!)
    }
    if (candidates.length === 0) candidates = all
    candidates.sort((a, b) => b.lastEpoch - a.lastEpoch || b.last - a.last || latest.chain.indexOf(a.node) - latest.chain.indexOf(b.node))
    return candidates[0].node
  }

  private async probe (addr: string): Promise<PeerInfo | null> {
    const r = await this.probeState(addr)
    return typeof r === 'object' ? r : null
  }

  // What a member says about itself, or why it said nothing: 'refused' (nothing listens: the
  // process is gone, strong evidence of death on one machine) or 'silent' (it did not answer in
  // time: it may be paused or overloaded, which is only suspicion).
  private async probeState (addr: string): Promise<PeerInfo | 'refused' | 'silent'> {
    let peer: PeerSocket | null = null
    try {
      peer = await connectPeer(this.opts.me, addr, this.opts.secret, this.opts.failureTimeoutMs)
      const p = peer
      const reply = await new Promise<PeerMessage>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('probe timed out')), this.opts.failureTimeoutMs)
        p.once('message', (m: PeerMessage) => { clearTimeout(timer); resolve(m) })
        p.once('close', () => { clearTimeout(timer); reject(new Error('closed')) })
        p.send({ t: 'probe' })
      })
      return reply.t === 'info' ? reply.info as PeerInfo : 'silent'
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code
      return code === 'ECONNREFUSED' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH' ? 'refused' : 'silent'
    } finally {
      peer?.close()
    }
  }

  private info (): PeerInfo {
    return { node: this.opts.me, role: this.role, epoch: this.meta.epoch, chain: this.meta.chain, learner: this.meta.learner, applied: this.state.index, last: this.lastIndex(), lastEpoch: this.lastEpoch, storage: this.storageFailing ? 'failing' : 'ok' }
  }

  private async askToJoin (head: string): Promise<boolean> {
    let peer: PeerSocket | null = null
    try {
      peer = await connectPeer(this.opts.me, head, this.opts.secret, this.opts.failureTimeoutMs)
      const p = peer
      const reply = await new Promise<PeerMessage>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('join timed out')), this.opts.failureTimeoutMs * 5)
        p.once('message', (m: PeerMessage) => { clearTimeout(timer); resolve(m) })
        p.once('close', () => { clearTimeout(timer); reject(new Error('closed')) })
        p.send({ t: 'join' })
      })
      if (reply.t !== 'joined') return false
      if (this.pred !== null) return true // the tail already reached us
      // Adopt the chain's configuration, so its tail's sync at that epoch is accepted.
      this.saveMeta({ epoch: Number(reply.epoch), chain: reply.chain as string[], learner: this.opts.me })
      this.setRole('joining', `joining through ${head}`)
      this.opts.log('info', 'joining the chain as a learner', { head, epoch: this.meta.epoch, chain: this.meta.chain })
      return true
    } catch {
      return false
    } finally {
      peer?.close()
    }
  }

  // ---- leading -----------------------------------------------------------------------------

  private becomePrimary (epoch: number, chain: string[], why: string): void {
    this.saveMeta({ epoch, chain, learner: null })
    this.committer?.abandon(errors.unavailable('configuration changed'))
    this.committer = new Committer(this.store, this.state, epoch, (r, a) => {
      // The primary applies only what the whole chain holds: applied is committed. (The local
      // write finishes after the chain's acknowledgement, so this is where commit advances.)
      this.commitIndex = r.i
      this.persistCommitLazily()
      this.recent.push(r)
      this.lastEpoch = r.e
      this.opts.onApplied(r, a)
    }, (e) => this.onStorageFailure(e), this.unapplied)
    this.committer.replicator = { forward: () => this.onForward() }
    this.committer.quotaBytes = this.opts.quotaBytes ?? Infinity
    this.committer.mailboxQuotaBytes = this.opts.mailboxQuotaBytes ?? Infinity
    this.unapplied = []
    this.dropPredecessor()
    this.setRole('primary', why)
    this.linkSuccessor()
    this.onSuccessorAck(null)
  }

  // A new batch was stamped: send it on, or, with no successor in the write path, commit it.
  private onForward (): void {
    this.succ?.pump()
    if (!this.hasSuccessorInPath()) this.onSuccessorAck(null)
  }

  // Whether the configuration puts a member after us in the write path (a learner is not in it).
  // If it does, nothing is acknowledged until that member is linked and has persisted it: a
  // broken link holds writes back, it never lets them through unreplicated.
  private hasSuccessorInPath (): boolean {
    const k = this.meta.chain.indexOf(this.opts.me)
    return k >= 0 && k < this.meta.chain.length - 1
  }

  // The successor acknowledged more, or (link null) something else may let us acknowledge more.
  onSuccessorAck (link: SuccessorLink | null): void {
    if (link && link !== this.succ) return
    if (this.succ?.learner && link === this.succ) this.maybePromoteLearner()
    const upTo = this.ackUpstream()
    if (upTo === null) return
    if (this.role === 'primary' && this.committer) {
      this.committer.acked(upTo)
      return
    }
    this.sendAck(upTo)
  }

  private sendAck (index: number): void {
    if (index > this.ackedUp) this.ackedUp = index
    this.pred?.send({ t: 'ack', index: this.ackedUp })
  }

  // What may be acknowledged upstream (or, on the primary, committed): what this member holds
  // and, if the configuration names a successor, only what that successor acknowledged too.
  // Null when the named successor is not linked.
  private ackUpstream (): number | null {
    const mine = this.offerUpTo()
    if (!this.hasSuccessorInPath()) return mine
    const link = this.succ
    if (!link || link.learner) return null
    return Math.min(mine, link.acked)
  }

  // The highest index this member can send to its successor right now.
  offerUpTo (): number {
    return this.role === 'primary' && this.committer ? this.committer.lastAssigned : Math.min(this.lastIndex(), this.verified)
  }

  // Records [from, upTo] held in memory: recent durable ones, then (on the primary) those not
  // yet durable here. Null if `from` is older than memory reaches: read the log files.
  recordsFrom (from: number, upTo: number): LogRecord[] | null {
    const durable = this.lastIndex()
    if (from > durable) return this.committer ? this.committer.pendingFrom(from).filter(r => r.i <= upTo).slice(0, 5000) : []
    return this.recent.range(from, Math.min(upTo, durable), 5000)
  }

  // (Re)connect to the successor the configuration names: the next member of the chain, or,
  // for the tail, the learner catching up behind it.
  private linkSuccessor (): void {
    this.succ?.close()
    this.succ = null
    const k = this.meta.chain.indexOf(this.opts.me)
    const target = k >= 0 && k + 1 < this.meta.chain.length ? this.meta.chain[k + 1] : (k === this.meta.chain.length - 1 ? this.meta.learner : null)
    if (!target) return
    const learner = target === this.meta.learner
    const epoch = this.meta.epoch
    connectPeer(this.opts.me, target, this.opts.secret, this.opts.failureTimeoutMs).then(peer => {
      if (this.stopped || this.meta.epoch !== epoch || this.succ !== null) {
        peer.close()
        return
      }
      this.succ = new SuccessorLink(this, target, learner, peer)
      this.succ.start(this.meta, this.commitIndex)
      this.opts.log('info', 'linked to successor', { successor: target, learner, epoch })
    }, e => {
      if (this.stopped || this.meta.epoch !== epoch) return
      this.opts.log('warn', 'cannot reach successor', { successor: target, error: String(e) })
      this.successorGone(target)
    })
  }

  onSuccessorFailed (link: SuccessorLink, why: string): void {
    if (link !== this.succ || this.stopped) return
    this.succ = null
    this.opts.log('warn', 'peer lost', { peer: link.target, why, epoch: this.meta.epoch })
    this.successorGone(link.target)
  }

  // Our successor is unreachable. The primary checks, then drops it from the configuration; a
  // backup reports it upstream and lets the primary decide.
  private successorGone (target: string): void {
    if (this.role === 'primary') this.removeMember(target, 'unreachable')
    else if (this.pred) this.pred.send({ t: 'suspect', epoch: this.meta.epoch, member: target })
  }

  // Relayed reports from downstream: a member suspected dead, or a learner ready to join.
  onReport (m: PeerMessage): void {
    if (Number(m.epoch) !== this.meta.epoch) return
    if (this.role !== 'primary') {
      this.pred?.send(m)
      return
    }
    if (m.t === 'suspect' && typeof m.member === 'string') this.removeMember(m.member, 'reported unreachable')
    if (m.t === 'promote' && m.member === this.meta.learner) this.reconfigure({ epoch: this.meta.epoch + 1, chain: [...this.meta.chain, m.member as string], learner: null }, `learner ${m.member as string} caught up`)
  }

  private maybePromoteLearner (): void {
    const link = this.succ
    if (!link || !link.learner || this.meta.learner !== link.target) return
    if (this.lastIndex() - link.acked > 1000) return
    // Close behind is not caught up if what it needs next is compacted away: it is about to get
    // a snapshot, and in the write path it would hold every write up until that is installed.
    if (link.acked + 1 < this.store.log.firstIndex) return
    const report = { t: 'promote', epoch: this.meta.epoch, member: link.target }
    if (this.role === 'primary') this.onReport(report)
    else this.pred?.send(report)
  }

  // Drop a member, but only after checking it really is gone: a member that answers is alive,
  // and if it knows a newer or a conflicting configuration, this primary is stale and steps down.
  // A member that is merely silent (paused?) is dropped only if others remain in the chain to
  // fence a stale primary; to go on alone, the others must be known dead (connection refused).
  private removeMember (member: string, why: string): void {
    if (this.reconfiguring) return
    this.reconfiguring = true
    const epoch = this.meta.epoch
    this.probeState(member).then(res => {
      this.reconfiguring = false
      if (this.role !== 'primary' || this.meta.epoch !== epoch || this.stopped) return
      if (typeof res === 'object') {
        if (res.epoch > epoch || (res.epoch === epoch && !sameConfig(res, this.meta))) {
          this.stepDown(`${member} knows configuration epoch ${res.epoch} (${res.chain.join(', ')})`)
          return
        }
        if (res.storage !== 'failing') {
          if (this.meta.chain.includes(member) || this.meta.learner === member) {
            // Alive, and behind or at our configuration: the link broke, the member did not.
            this.reconfigure({ epoch: epoch + 1, chain: this.meta.chain, learner: this.meta.learner }, `relinking ${member}`)
          }
          return
        }
        // Alive, but its disk refuses writes: go on without it. It asks to join again later.
      }
      const chain = this.meta.chain.filter(m => m !== member)
      if (res === 'silent' && chain.length === 1 && this.meta.chain.includes(member)) {
        this.opts.log('warn', 'a silent member cannot be confirmed dead; holding writes rather than going on alone', { member })
        setTimeout(() => { if (!this.succ && this.role === 'primary') this.removeMember(member, why) }, this.opts.failureTimeoutMs).unref()
        return
      }
      this.reconfigure({ epoch: epoch + 1, chain, learner: this.meta.learner === member ? null : this.meta.learner }, `${member} ${why} (${typeof res === 'object' ? 'its storage is failing' : res})`)
    }, () => { this.reconfiguring = false })
  }

  // Adopt a new configuration as primary: persist it, then relink down the chain, which
  // resends whatever the new successor lacks.
  private reconfigure (cfg: ChainConfig, why: string): void {
    if (cfg.chain[0] !== this.opts.me) throw new Error('only the primary reconfigures')
    this.saveMeta(cfg)
    this.opts.log('info', 'reconfigured', { why, epoch: cfg.epoch, chain: cfg.chain, learner: cfg.learner })
    this.linkSuccessor()
    this.onSuccessorAck(null)
  }

  // A successor refused our configuration. If it holds a newer one, or another one with the same
  // epoch (someone else took over meanwhile), we are stale.
  onRejected (target: string, m: PeerMessage): void {
    const epoch = Number(m.epoch)
    const theirs = { epoch, chain: Array.isArray(m.chain) ? m.chain as string[] : [], learner: (m.learner as string | null) ?? null }
    if (epoch > this.meta.epoch || (epoch === this.meta.epoch && !sameConfig(theirs, this.meta))) this.stepDown(`${target} is at epoch ${epoch}`)
  }

  // Stop leading: nothing more can be acknowledged here. Pending requests have unknown
  // outcomes; their clients are disconnected and retry elsewhere with their rids.
  private stepDown (why: string): void {
    if (this.role !== 'primary') return
    this.opts.log('warn', 'stepping down', { why, epoch: this.meta.epoch })
    // Disconnect clients first: their pending requests may yet be committed by the new primary,
    // so they must not be told "nothing was applied"; they retry with their rids.
    this.opts.dropClients()
    this.committer?.abandon(errors.unavailable('this server stopped being the primary'))
    this.committer = null
    this.succ?.close()
    this.succ = null
    this.setRole('joining', why)
    this.discover()
  }

  // A write was refused (a full disk) but the disk can still be trusted: stop acknowledging,
  // leave the chain, and try to join again later, waiting longer after each failure in a row.
  // Until a write succeeds, probes report the storage as failing, so the primary drops this
  // member rather than relinking it.
  private leaveOnStorageError (): void {
    this.storageFailures++
    this.dropPredecessor()
    this.succ?.close()
    this.succ = null
    this.setRole('joining', 'local storage failed')
    const delay = Math.min(this.opts.failureTimeoutMs * 2 ** Math.min(this.storageFailures, 5), this.opts.failureTimeoutMs * 20)
    this.storageRetryAt = Date.now() + delay
    setTimeout(() => this.discover(), delay).unref()
  }

  get storageFailing (): boolean { return this.storageFailures > 0 }

  private onStorageFailure (e: ChatError): void {
    this.opts.log('error', 'storage error', { error: e.message })
    if (this.role === 'primary') this.stepDown('local storage failed')
    if (this.store.log.failed) this.opts.onFatal(new Error(`fsync failed, the disk cannot be trusted: ${e.message}`))
  }

  private persistCommitLazily (): void {
    if (Date.now() - this.commitSavedAt < 1000) return
    try {
      this.saveMeta(this.meta)
    } catch (e) {
      this.opts.log('warn', 'could not save the commit index', { error: String(e) })
    }
  }

  // ---- following ---------------------------------------------------------------------------

  // A peer connected to us. After authentication its first message says what it wants.
  async acceptPeer (socket: net.Socket, hello: Record<string, unknown>): Promise<void> {
    const peer = await acceptPeer(this.opts.me, socket, hello, this.opts.secret, this.opts.requireLoopback, this.opts.failureTimeoutMs)
    if (!peer) {
      this.opts.log('warn', 'peer connection refused', { from: String(hello.from).slice(0, 80), address: socket.remoteAddress })
      return
    }
    peer.once('message', (m: PeerMessage) => {
      switch (m.t) {
        case 'probe':
          peer.send({ t: 'info', info: this.info() })
          return
        case 'join':
          this.onJoinRequest(peer)
          return
        case 'sync':
          this.onSync(peer, m)
          return
        case 'remove':
          this.onRemoveRequest(peer, String(m.member))
          return
        case 'retire':
          this.retire(peer, m)
          return
        default:
          peer.close()
      }
    })
  }

  private onJoinRequest (peer: PeerSocket): void {
    const member = peer.remote
    if (this.role !== 'primary' || this.reconfiguring) {
      peer.send({ t: 'not_joined', why: 'not the primary' })
      return
    }
    if (this.meta.learner !== null && this.meta.learner !== member) {
      peer.send({ t: 'not_joined', why: 'another server is joining' })
      return
    }
    if (this.meta.learner === member) {
      peer.send({ t: 'joined', epoch: this.meta.epoch, chain: this.meta.chain })
      return
    }
    // A member that asks to join has restarted: whatever place it had is gone.
    const cfg = { epoch: this.meta.epoch + 1, chain: this.meta.chain.filter(m => m !== member), learner: member }
    this.reconfigure(cfg, `${member} asked to join`)
    peer.send({ t: 'joined', epoch: cfg.epoch, chain: cfg.chain })
  }

  // An operator removes a member on purpose (bin/admin.js). The member is told to retire, so it
  // does not try to rejoin; it stays out until started again with --join.
  private onRemoveRequest (peer: PeerSocket, member: string): void {
    if (this.role !== 'primary') {
      peer.send({ t: 'not_removed', why: 'not the primary', primary: this.role === 'backup' ? this.meta.chain[0] : null })
      return
    }
    if (member === this.opts.me) {
      peer.send({ t: 'not_removed', why: 'the primary cannot remove itself: stop it, and the next member takes over' })
      return
    }
    if (!this.meta.chain.includes(member) && this.meta.learner !== member) {
      peer.send({ t: 'not_removed', why: `${member} is not in the chain` })
      return
    }
    const cfg = { epoch: this.meta.epoch + 1, chain: this.meta.chain.filter(m => m !== member), learner: this.meta.learner === member ? null : this.meta.learner }
    this.reconfigure(cfg, `${member} removed by an operator`)
    peer.send({ t: 'removed', epoch: cfg.epoch, chain: cfg.chain })
    connectPeer(this.opts.me, member, this.opts.secret, this.opts.failureTimeoutMs).then(p => {
      p.send({ t: 'retire', epoch: cfg.epoch, chain: cfg.chain })
      setTimeout(() => p.close(), 1000).unref()
    }, () => { /* already gone: it will find itself outside the chain if it comes back */ })
  }

  private retire (peer: PeerSocket, m: PeerMessage): void {
    const epoch = Number(m.epoch)
    const chain = m.chain as string[]
    peer.close()
    if (!(epoch > this.meta.epoch) || chain.includes(this.opts.me) || chain[0] !== peer.remote) return
    this.opts.log('warn', 'removed from the chain by an operator', { by: peer.remote, epoch })
    this.stepDown('removed by an operator')
    this.dropPredecessor()
    this.succ?.close()
    this.succ = null
    this.saveMeta({ epoch, chain, learner: null }, true)
    this.setRole('retired', 'removed from the chain by an operator; start with --join to come back')
  }

  // A predecessor opens the replication stream with its configuration.
  private onSync (peer: PeerSocket, m: PeerMessage): void {
    const cfg: ChainConfig = { epoch: Number(m.epoch), chain: m.chain as string[], learner: (m.learner as string | null) ?? null }
    const k = cfg.chain.indexOf(this.opts.me)
    const expectedPred = k > 0 ? cfg.chain[k - 1] : (cfg.learner === this.opts.me ? cfg.chain[cfg.chain.length - 1] : null)
    const newer = cfg.epoch > this.meta.epoch
    const same = cfg.epoch === this.meta.epoch && sameConfig(cfg, this.meta)
    if (!(newer || same) || expectedPred !== peer.remote || !Number.isSafeInteger(cfg.epoch)) {
      peer.send({ t: 'reject', epoch: this.meta.epoch, chain: this.meta.chain, learner: this.meta.learner })
      setTimeout(() => peer.close(), 100).unref()
      return
    }
    // Keep what we hold if the new predecessor was upstream of us while we followed without a
    // break (the middle died, or the primary did): it holds all of it, and some of it may be
    // acknowledged already. Dropping it here would lose those writes if this predecessor died
    // before resending them. Otherwise (a restart, a former primary, a learner) our suffix may
    // never have been committed, and goes.
    const mineAt = this.meta.chain.indexOf(this.opts.me)
    const predAt = this.meta.chain.indexOf(peer.remote)
    const keep = this.followingSinceStart && this.role === 'backup' && predAt >= 0 && mineAt > predAt
    if (this.role === 'primary') this.stepDown(`a newer configuration names ${peer.remote} as our predecessor`)
    try {
      this.saveMeta(cfg)
    } catch (e) {
      this.opts.log('error', 'storage error; leaving the chain', { error: `cannot save the configuration: ${String(e)}` })
      peer.close()
      this.leaveOnStorageError()
      return
    }
    this.dropPredecessor()
    this.pred = peer
    this.predName = peer.remote
    this.ackedUp = 0
    // A snapshot that was coming in over the old link is sent again from its start, if needed.
    this.snapshotChunks = []
    this.setRole(k >= 0 ? 'backup' : 'joining', `synced from ${peer.remote} at epoch ${cfg.epoch}`)
    // The predecessor resends from our applied index on; what we hold is either kept (each
    // record it resends is compared with ours: see receive) or discarded now.
    if (!keep) {
      this.store.log.truncateAfter(this.state.index)
      this.recent.truncateAfter(this.state.index)
      this.unapplied = []
      this.lastEpoch = this.state.lastEpoch
    }
    this.verified = this.state.index
    this.followingSinceStart = true
    this.commitIndex = Math.max(this.commitIndex, this.state.index)
    peer.on('message', (msg: PeerMessage) => this.onPredMessage(peer, msg))
    peer.on('close', () => this.onPredecessorLost(peer, 'link closed'))
    this.predTimer = setInterval(() => {
      // A learner's predecessor may be busy sending a large snapshot, and so may ours while a
      // snapshot comes in and is installed: a longer leash.
      const bulk = this.role === 'joining' || this.snapshotChunks.length > 0 || Date.now() - this.snapshotInstalledAt < this.opts.failureTimeoutMs * 10
      if (Date.now() - peer.lastHeard > this.opts.failureTimeoutMs * (bulk ? 10 : 1)) {
        peer.close()
      }
    }, this.opts.heartbeatMs)
    peer.send({ t: 'synced', applied: this.state.index })
    this.opts.log('info', 'following', { predecessor: peer.remote, epoch: cfg.epoch, chain: cfg.chain, learner: cfg.learner, from: this.state.index + 1, kept: keep ? this.lastIndex() - this.state.index : 0 })
    this.linkSuccessor()
  }

  private onPredMessage (peer: PeerSocket, m: PeerMessage): void {
    if (peer !== this.pred) return
    if (Number(m.epoch) !== this.meta.epoch) {
      peer.send({ t: 'reject', epoch: this.meta.epoch, chain: this.meta.chain, learner: this.meta.learner })
      peer.close()
      return
    }
    switch (m.t) {
      case 'append':
        this.receive(m.records as LogRecord[])
        this.applyCommitted(Number(m.commit))
        return
      case 'hb':
        this.applyCommitted(Number(m.commit))
        this.sendAck(this.ackUpstream() ?? this.ackedUp)
        return
      case 'snapshot':
        this.snapshotChunks.push(...(m.chunks as Array<Record<string, unknown>>))
        if (m.done) {
          try {
            this.state = this.store.installSnapshot(this.snapshotChunks)
          } catch (e) {
            this.snapshotChunks = []
            if (!(e instanceof ChatError) && typeof (e as NodeJS.ErrnoException).code !== 'string') throw e
            this.opts.log('error', 'storage error; leaving the chain', { error: `cannot write the snapshot: ${String(e)}` })
            this.leaveOnStorageError()
            return
          }
          this.storageFailures = 0
          this.verified = this.state.index
          this.snapshotInstalledAt = Date.now()
          this.snapshotChunks = []
          this.unapplied = []
          this.recent.clear()
          this.lastEpoch = this.state.lastEpoch
          this.commitIndex = Math.max(this.commitIndex, this.state.index)
          this.opts.log('info', 'installed a snapshot from the chain', { index: this.state.index })
        }
        return
      case 'suspect':
      case 'promote':
        return
      default:
        peer.close()
    }
  }

  // Records from the predecessor: persist them (many messages share one fsync), then forward.
  private receive (records: LogRecord[]): void {
    // Records we hold already (kept at the sync): the same record again is skipped; at the first
    // that differs, ours are discarded from there on (they were never acknowledged: see verified).
    let k = 0
    while (k < records.length && records[k].i <= this.heldEnd()) {
      const r = records[k]
      if (r.i <= this.state.index) break // already applied: an out-of-order stream, refused below
      const mine = this.held(r.i)
      if (mine === undefined || JSON.stringify(mine) !== JSON.stringify(r)) {
        this.discardFrom(r.i)
        break
      }
      this.verified = Math.max(this.verified, r.i)
      k++
    }
    if (k > 0) records = records.slice(k)
    if (records.length === 0) {
      this.sendAck(this.ackUpstream() ?? this.ackedUp)
      this.succ?.pump()
      return
    }
    const expected = this.heldEnd() + 1
    if (records[0].i !== expected) {
      this.opts.log('warn', 'out-of-order records from the predecessor; resyncing', { got: records[0].i, expected })
      this.pred?.close()
      return
    }
    if (!this.receiving) {
      this.receiving = { records: [], frames: [] }
      setImmediate(() => this.persistReceived())
    }
    for (const r of records) {
      this.receiving.records.push(r)
      this.receiving.frames.push(encodeRecordFrame(r))
    }
    this.verified = records[records.length - 1].i
  }

  // The last index held: durable, or received and about to be written.
  private heldEnd (): number {
    return this.lastIndex() + (this.receiving ? this.receiving.records.length : 0)
  }

  // The record held at index i (beyond the applied state), if any.
  private held (i: number): LogRecord | undefined {
    const last = this.lastIndex()
    if (i > last) return this.receiving?.records[i - last - 1]
    const first = this.unapplied.length > 0 ? this.unapplied[0].i : last + 1
    const r = this.unapplied[i - first]
    return r?.i === i ? r : undefined
  }

  // Throw away every record held from index i on (never an applied one).
  private discardFrom (i: number): void {
    const keepTo = Math.max(i - 1, this.state.index)
    this.opts.log('warn', 'discarding records the predecessor does not hold', { from: keepTo + 1, to: this.heldEnd() })
    if (this.receiving) {
      const n = this.receiving.records.findIndex(r => r.i > keepTo)
      if (n >= 0) {
        this.receiving.records.splice(n)
        this.receiving.frames.splice(n)
      }
    }
    if (keepTo < this.lastIndex()) {
      this.store.log.truncateAfter(keepTo)
      this.recent.truncateAfter(keepTo)
      this.unapplied = this.unapplied.filter(r => r.i <= keepTo)
    }
    this.verified = Math.min(this.verified, keepTo)
  }

  private persistReceived (): void {
    const batch = this.receiving
    this.receiving = null
    if (!batch || batch.records.length === 0) return
    const last = batch.records[batch.records.length - 1]
    try {
      this.store.append({ frames: Buffer.concat(batch.frames), lastIndex: last.i })
    } catch (e) {
      // After a failed write or fsync this member must not acknowledge anything: leave the
      // chain. The predecessor notices and carries on without us; we rejoin later.
      this.opts.log('error', 'storage error; leaving the chain', { error: String(e) })
      if (this.store.log.failed) {
        this.opts.onFatal(new Error(`fsync failed, the disk cannot be trusted: ${String(e)}`))
        return
      }
      this.leaveOnStorageError()
      return
    }
    this.storageFailures = 0
    crashPoint('after-fsync-before-forward')
    if (this.role === 'joining' && Date.now() - this.progressLoggedAt > 2000) {
      this.progressLoggedAt = Date.now()
      this.opts.log('info', 'catch-up progress', { index: last.i, commit: this.commitIndex, from: this.predName })
    }
    for (const r of batch.records) {
      this.unapplied.push(r)
      this.recent.push(r)
    }
    this.lastEpoch = last.e
    this.succ?.pump()
    this.onSuccessorAck(null)
  }

  private applyCommitted (commit: number): void {
    if (!Number.isSafeInteger(commit)) return
    if (commit > this.commitIndex) this.commitIndex = commit
    let n = 0
    const upTo = this.role === 'primary' ? this.commitIndex : Math.min(this.commitIndex, this.verified)
    while (n < this.unapplied.length && this.unapplied[n].i <= upTo) this.state.apply(this.unapplied[n++])
    if (n > 0) {
      this.unapplied.splice(0, n)
      this.store.maybeSnapshot(this.state)
    }
    this.persistCommitLazily()
  }

  private dropPredecessor (): void {
    if (this.predTimer) clearInterval(this.predTimer)
    this.predTimer = null
    const p = this.pred
    this.pred = null
    this.predName = null
    p?.close()
  }

  // The predecessor went quiet or away. If every member ahead of us is gone, we lead;
  // otherwise the primary will reconfigure (and we check again if it does not).
  private onPredecessorLost (peer: PeerSocket, why: string): void {
    if (peer !== this.pred || this.stopped) return
    const lost = this.predName
    this.dropPredecessor()
    this.opts.log('warn', 'peer lost', { peer: lost, why, epoch: this.meta.epoch })
    this.checkAhead().catch(e => this.opts.log('error', 'failover check failed', { error: String(e) }))
  }

  private async checkAhead (): Promise<void> {
    for (let attempt = 0; !this.stopped && this.pred === null && (this.role === 'backup' || this.role === 'joining'); attempt++) {
      if (this.meta.retired) return
      const k = this.meta.chain.indexOf(this.opts.me)
      if (k < 0) {
        // A learner whose tail vanished: start over.
        this.setRole('joining', 'lost the member we were catching up from')
        this.discover()
        return
      }
      const ahead = this.meta.chain.slice(0, k)
      const states = await Promise.all(ahead.map(a => this.probeState(a)))
      const infos = states.filter((x): x is PeerInfo => typeof x === 'object')
      if (this.pred !== null || this.stopped) return
      const newer = infos.filter(i => i.epoch > this.meta.epoch)
      if (newer.length > 0) {
        if (!newer.some(i => i.chain.includes(this.opts.me))) {
          this.setRole('joining', 'the chain moved on without us')
          this.discover()
          return
        }
      } else if (infos.length === 0) {
        const chain = this.meta.chain.slice(k)
        // Alone, we would have nobody to fence a primary that is only paused: take over alone
        // only from members known dead.
        if (chain.length > 1 || states.every(x => x === 'refused')) {
          this.becomePrimary(this.meta.epoch + 1, chain, `every member ahead (${ahead.join(', ')}) is unreachable (${states.join(', ')})`)
          return
        }
        if (attempt === 0) this.opts.log('warn', 'members ahead are silent but not confirmed dead; waiting rather than leading alone', { ahead })
      }
      await sleep(this.opts.failureTimeoutMs)
    }
  }
}

// A state's snapshot chunks, as JSON, in batches for the peer link: at most 50 chunks and about
// peerLineBytesMax / 8 a batch, chunks that are bigger on their own cut in two (encodeInPieces).
// A chunk that cannot be cut is one exactly-once entry, which fits in a line.
export function * snapshotBatches (chunks: Iterable<SnapshotChunk>, batchBytes = peerLineBytesMax / 8): Generator<string[]> {
  let batch: string[] = []
  let bytes = 0
  for (const chunk of chunks) {
    for (const json of encodeInPieces(chunk, c => JSON.stringify(c), s => s.length, batchBytes)) {
      if (batch.length > 0 && (batch.length >= 50 || bytes + json.length > batchBytes)) {
        yield batch
        batch = []
        bytes = 0
      }
      batch.push(json)
      bytes += json.length
    }
  }
  yield batch
}
