// Test-only fault hooks, switched on by environment variables and inert otherwise. They let the
// fault suite crash a server at chosen points, simulate losing the page cache, and fail an fsync
// through the storage layer. Never set these in production.
//
//   CHAINCHAT_CRASH_AT=<point>[:<n>]  SIGKILL this process the n-th time (default 1st) it
//                                     reaches <point>: after-append-before-fsync,
//                                     after-fsync-before-forward, before-reply, mid-snapshot,
//                                     before-resend (a successor answered a sync; nothing
//                                     re-sent to it yet)
//   CHAINCHAT_TRACK_DURABLE=1         after every fsync of the log, record in <data>/DURABLE
//                                     which segment file and how many bytes of it are durable
//   CHAINCHAT_FAIL_FSYNC_AFTER=<n>    the fsync after the first n fsyncs of the log fails (EIO)
//   CHAINCHAT_HELPER_READS=<bytes>    recovery reads the log and the snapshot on the helper
//                                     thread (storage/checksums.ts) whatever their size, <bytes>
//                                     at a time, so that decoding catches up with it often

import fs from 'node:fs'
import path from 'node:path'
import type { FileOps } from './storage/files.ts'

export type CrashPoint = 'after-append-before-fsync' | 'after-fsync-before-forward' | 'before-reply' | 'mid-snapshot' | 'before-resend'

const crashSpec = /^([a-z-]+)(?::(\d+))?$/.exec(process.env.CHAINCHAT_CRASH_AT ?? '')
let crashCountdown = crashSpec ? Number(crashSpec[2] ?? 1) : 0

export function crashPoint (point: CrashPoint): void {
  if (!crashSpec || crashSpec[1] !== point) return
  if (--crashCountdown > 0) return
  process.stderr.write(JSON.stringify({ t: new Date().toISOString(), level: 'warn', msg: 'test crash point reached', point }) + '\n')
  process.kill(process.pid, 'SIGKILL')
}

export const trackDurable = process.env.CHAINCHAT_TRACK_DURABLE === '1'

// The Store options CHAINCHAT_HELPER_READS sets (none without it).
export function helperReads (): { parallelChecksumBytes: number, helperReadBytes: number } | Record<string, never> {
  const bytes = Number(process.env.CHAINCHAT_HELPER_READS ?? '')
  return Number.isSafeInteger(bytes) && bytes > 0 ? { parallelChecksumBytes: 0, helperReadBytes: bytes } : {}
}

const durableFds = new Map<string, number>()

// Record the durable length of the open segment (no fsync: it only has to survive SIGKILL).
// One fixed-size write in place, so a kill never leaves the note half-written.
export function noteDurable (dir: string, segmentFile: string, bytes: number): void {
  if (!trackDurable) return
  let fd = durableFds.get(dir)
  if (fd === undefined) durableFds.set(dir, fd = fs.openSync(path.join(dir, 'DURABLE'), 'w'))
  const note = Buffer.alloc(256, 0x20)
  note.write(JSON.stringify({ file: path.basename(segmentFile), bytes }))
  fs.writeSync(fd, note, 0, note.length, 0)
}

// Wrap file operations so that the fsync after the first n fails, as a dying disk would.
export function withFsyncFailure (files: FileOps): FileOps {
  const after = Number(process.env.CHAINCHAT_FAIL_FSYNC_AFTER ?? '')
  if (!Number.isSafeInteger(after) || process.env.CHAINCHAT_FAIL_FSYNC_AFTER === undefined) return files
  let n = 0
  const eio = (): Error => Object.assign(new Error('EIO: i/o error, fdatasync (injected)'), { code: 'EIO' })
  return {
    ...files,
    fdatasyncSync: (fd) => {
      if (n++ >= after) throw eio()
      files.fdatasyncSync(fd)
    },
    fdatasync: (fd, cb) => {
      if (n++ >= after) process.nextTick(cb, eio())
      else files.fdatasync(fd, cb)
    }
  }
}
