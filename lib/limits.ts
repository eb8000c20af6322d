// Every bound and timeout in one place, unit last. Config flags may override some of them.

export const limits = {
  // wire
  lineBytesMax: 64 * 1024,
  idLengthMax: 128,
  ridLengthMax: 64,
  userLengthMax: 32,
  passwordBytesMax: 1024,
  textBytesMax: 4096,
  patternLengthMax: 256,
  deleteIdsMax: 1000,
  usersLimitDefault: 100,
  usersLimitMax: 1000,
  readLimitDefault: 10,
  readLimitMax: 1000,
  historyLimitDefault: 50,
  historyLimitMax: 1000,

  // per connection: requests accepted but not yet answered; reading pauses beyond this
  connectionInflightMax: 256,
  // replies and pushes queued in the kernel-side socket buffer and Node's write buffer;
  // a client that lets more than this pile up is too slow and is disconnected
  connectionOutboundBytesMax: 8 * 1024 * 1024,
  // ... and what piles up for all clients together may take this share of V8's heap limit
  // (it waits in the heap; see server.ts): past it, the clients waiting longest are disconnected
  outboundHeapShare: 1 / 8,
  // and the unfinished lines of all clients together this share (split2 holds each until its
  // newline comes; 10,000 connections with a line of 64 KiB each would hold 640 MiB)
  partialHeapShare: 1 / 16,
  connectionsMax: 10_000,
  // logged-in connections of one account at once: each message sent to it is written to every
  // one of them (1,000 sessions made each send take about 12 ms of the server's time)
  sessionsPerUserMax: 100,

  // storage
  recordBytesMax: 1024 * 1024,
  // a snapshot cuts its chunks to about recordBytesMax each; one exactly-once entry cannot be
  // cut, and a read's stored reply may hold a thousand messages: a snapshot frame may be this big
  snapshotFrameBytesMax: 64 * 1024 * 1024,
  snapshotEveryRecords: 100_000,
  snapshotEveryBytes: 64 * 1024 * 1024,
  // ... and not before the log since the last snapshot comes to this share of its size, so that
  // writing snapshots costs a bounded share of the work however big the state grows (see
  // Store.maybeSnapshot)
  snapshotGrowthPercent: 50,
  // a log segment is closed and a new one started once it holds this much, snapshot or not, so
  // that no segment outgrows what recovery reads into memory at once (see storage/log.ts)
  logSegmentBytes: 64 * 1024 * 1024,
  // recovery checks the log's checksums on a helper thread once the log holds this much (below,
  // starting the thread costs more than it saves; see storage/checksums.ts)
  parallelChecksumBytes: 16 * 1024 * 1024,
  // the server extends its open log segment with zeros this much at a time (see storage/log.ts)
  logPreallocateBytes: 1024 * 1024,
  // exactly-once table: oldest entries are evicted first, deterministically, by count
  ridsMax: 100_000,
  // the quota (--quota-mb) counts each message as its text and sender's name in UTF-8 bytes
  // plus this, about what the rest of it takes in memory (a million messages of 100 bytes
  // took about 210 MiB of heap), and each account as this much (see state.ts, storedBytes)
  messageOverheadBytes: 112,
  accountBytes: 512,
  // the default quota, as a share of V8's heap limit. The count is close to the heap a message
  // takes when its text is ASCII (4,106 bytes for 4,000 ASCII characters, counted 4,115), but a
  // text with any character beyond Latin-1 is held with two bytes per character (8,106 bytes for
  // 3,998 ASCII characters and an emoji): up to twice what is counted. A sixth leaves room for
  // that, the young generation (part of the limit: 48 of 144 MiB with --max-old-space-size=96),
  // the shares above for output and unfinished lines, the garbage collector, snapshots being
  // written and the requests in flight. (A third was too much for a heap limit of 144 MiB: a
  // flood of such texts filled it. A quarter was too much once the clients' output and
  // unfinished lines reached their bounds as well: test/server.test.ts, "all reached at once".)
  quotaHeapShare: 1 / 6,
  // the default quota of one mailbox (--mailbox-quota-mb), as a share of the default quota: so
  // that no one recipient can take the whole of it, however many send to them
  mailboxQuotaShare: 1 / 16,

  // passwords: scrypt parameters (N=2^14, r=8, p=1 is the interactive-login recommendation)
  scryptN: 16384,
  scryptR: 8,
  scryptP: 1,
  scryptKeyBytes: 32,
  // password hashes run at once, at most (they share libuv's thread pool, 4 threads, with the
  // log's fdatasync; see dispatcher.ts)
  scryptConcurrency: 2,
  saltBytes: 16,

  // replication
  heartbeatMs: 100,
  failureTimeoutMs: 1000,

  // shutdown
  shutdownGraceMs: 5000
} as const
