// The file operations storage uses, as one seam: tests inject a wrapper that fails chosen calls
// (a full disk, a failed fsync) without touching the real file system's behaviour otherwise.

import fs from 'node:fs'
import path from 'node:path'

export interface FileOps {
  openSync: typeof fs.openSync
  closeSync: typeof fs.closeSync
  writeSync: (fd: number, buf: Buffer, offset: number, length: number, position: number | null) => number
  fdatasyncSync: typeof fs.fdatasyncSync
  fdatasync: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void
  fsyncSync: typeof fs.fsyncSync
  fsync: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void
  ftruncateSync: typeof fs.ftruncateSync
  fstatSync: (fd: number) => fs.Stats
  readFileSync: (path: string) => Buffer
  renameSync: typeof fs.renameSync
  unlinkSync: typeof fs.unlinkSync
  unlink: (path: string, cb: (err: NodeJS.ErrnoException | null) => void) => void
  readdirSync: (path: string) => string[]
  mkdirSync: typeof fs.mkdirSync
}

export const realFiles: FileOps = {
  openSync: fs.openSync,
  closeSync: fs.closeSync,
  writeSync: (fd, buf, offset, length, position) => fs.writeSync(fd, buf, offset, length, position),
  fdatasyncSync: fs.fdatasyncSync,
  fdatasync: (fd, cb) => { fs.fdatasync(fd, cb) },
  fsyncSync: fs.fsyncSync,
  fsync: (fd, cb) => { fs.fsync(fd, cb) },
  ftruncateSync: fs.ftruncateSync,
  fstatSync: (fd) => fs.fstatSync(fd),
  readFileSync: (p) => fs.readFileSync(p),
  renameSync: fs.renameSync,
  unlinkSync: fs.unlinkSync,
  unlink: (p, cb) => { fs.unlink(p, cb) },
  readdirSync: (p) => fs.readdirSync(p),
  mkdirSync: fs.mkdirSync
}

// Write all of buf at `position` (default: the file's current position), looping over short
// writes.
export function writeAll (files: FileOps, fd: number, buf: Buffer, position: number | null = null): void {
  let done = 0
  while (done < buf.length) done += files.writeSync(fd, buf, done, buf.length - done, position === null ? null : position + done)
}

// Make a directory entry change (create, rename, unlink) durable.
export function fsyncDir (files: FileOps, dir: string): void {
  const fd = files.openSync(dir, 'r')
  try {
    files.fsyncSync(fd)
  } finally {
    files.closeSync(fd)
  }
}

// Durably replace the small file `file` in `dir` with `data`: written to a temporary file,
// fsync'd, renamed over the old one, and the directory fsync'd. Returns once it would survive a
// power loss.
export function replaceFileDurably (files: FileOps, dir: string, file: string, data: Buffer): void {
  const tmp = file + '.tmp'
  const fd = files.openSync(tmp, 'w')
  try {
    writeAll(files, fd, data)
    files.fsyncSync(fd)
  } finally {
    files.closeSync(fd)
  }
  files.renameSync(tmp, file)
  fsyncDir(files, dir)
}

// Create a directory and any parents it lacks, as `mkdir -p` does. Not fs.mkdirSync's recursive
// mode: where mkdir fails with ENOENT though the parent exists (under /proc, for one), Node 20's
// retries forever, at full CPU and deaf to signals; this throws that ENOENT.
export function makeDirs (dir: string): void {
  try {
    fs.mkdirSync(dir)
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code
    if (code === 'EEXIST') {
      if (!fs.statSync(dir).isDirectory()) throw e
      return
    }
    const parent = path.dirname(dir)
    if (code !== 'ENOENT' || parent === dir) throw e
    makeDirs(parent)
    fs.mkdirSync(dir) // an ENOENT now is not a missing parent: it is thrown
  }
}
