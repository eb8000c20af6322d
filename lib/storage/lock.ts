// One server per data directory, enforced with proper-lockfile (an atomic mkdir of <dir>/LOCK,
// its mtime refreshed while the server lives). Beside it, <dir>/LOCK.owner names the holder's
// pid, so a lock left by a process that was killed can be taken over at once instead of after
// the staleness timeout: a server restarted right after `kill -9` must not wait.

import fs from 'node:fs'
import path from 'node:path'
import lockfile from 'proper-lockfile'
import { makeDirs } from './files.ts'

export class DataDirLockedError extends Error {
  constructor (readonly dir: string, readonly pid: number | null) {
    super(`data directory ${dir} is in use by another server${pid ? ` (pid ${pid})` : ''}; stop it or choose another --data`)
    this.name = 'DataDirLockedError'
  }
}

function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
  // A killed process that its parent has not reaped yet is a zombie: dead, holding nothing.
  try {
    return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'))
  } catch {
    return true
  }
}

function readOwner (file: string): number | null {
  try {
    const pid = Number(JSON.parse(fs.readFileSync(file, 'utf8')).pid)
    return Number.isSafeInteger(pid) && pid > 0 ? pid : null
  } catch {
    return null
  }
}

// Take the lock. Resolves with a release function; onCompromised fires if the lock is lost
// while held (its directory removed or taken over), which the server treats as fatal.
export async function lockDataDir (dir: string, onCompromised: (e: Error) => void): Promise<() => Promise<void>> {
  makeDirs(dir)
  const lockPath = path.join(dir, 'LOCK')
  const ownerPath = path.join(dir, 'LOCK.owner')
  const opts = { realpath: false, lockfilePath: lockPath, stale: 10_000, update: 2_000, onCompromised }
  let release: () => Promise<void>
  try {
    release = await lockfile.lock(dir, opts)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ELOCKED') throw e
    const owner = readOwner(ownerPath)
    if (owner === null || owner === process.pid || isAlive(owner)) throw new DataDirLockedError(dir, owner)
    // The holder is gone: its lock is garbage. Remove it and take the lock properly; if another
    // starting server wins that race, mkdir fails for us and we report the directory in use.
    fs.rmSync(lockPath, { recursive: true, force: true })
    try {
      release = await lockfile.lock(dir, opts)
    } catch (e2) {
      if ((e2 as NodeJS.ErrnoException).code === 'ELOCKED') throw new DataDirLockedError(dir, readOwner(ownerPath))
      throw e2
    }
  }
  fs.writeFileSync(ownerPath, JSON.stringify({ pid: process.pid }) + '\n')
  return async () => {
    try { fs.unlinkSync(ownerPath) } catch { /* already gone */ }
    await release()
  }
}
