// The chain configuration a member knows, persisted in <data>/meta.json before it is acted on:
//
//   { "epoch": 7, "chain": ["127.0.0.1:9002", "127.0.0.1:9003"], "learner": null, "commit": 1234 }
//
// epoch   number of the configuration; every reconfiguration takes a new, higher one
// chain   members in order: the first is the primary, the last the tail
// learner a server catching up behind the tail before it joins, or null
// commit  an index known to be committed (applied by the primary); a lower bound, never above
//         the truth, so recovery may apply the log up to it and no further
//
// Written to a temporary file, fsync'd, renamed over the old one, and the directory fsync'd.

import fs from 'node:fs'
import path from 'node:path'
import { type FileOps, realFiles, replaceFileDurably } from '../storage/files.ts'

export interface ChainConfig {
  epoch: number
  chain: string[]
  learner: string | null
}

export interface Meta extends ChainConfig {
  commit: number
  retired?: boolean // removed from the chain by an operator: stays out until started with --join
}

export function sameConfig (a: ChainConfig, b: ChainConfig): boolean {
  return a.epoch === b.epoch && a.learner === b.learner && a.chain.length === b.chain.length && a.chain.every((m, k) => b.chain[k] === m)
}

export class MetaStore {
  private readonly file: string

  constructor (private readonly dir: string, private readonly files: FileOps = realFiles) {
    this.file = path.join(dir, 'meta.json')
  }

  // null when the directory has never been part of a chain.
  load (): Meta | null {
    let text: string
    try {
      text = fs.readFileSync(this.file, 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null
      throw e
    }
    const m = JSON.parse(text) as Meta
    if (!Number.isSafeInteger(m.epoch) || !Array.isArray(m.chain) || !Number.isSafeInteger(m.commit)) throw new Error(`${this.file} is not valid chain metadata`)
    return { epoch: m.epoch, chain: m.chain, learner: m.learner ?? null, commit: m.commit, retired: m.retired === true }
  }

  // Durably replace the metadata. Returns once it would survive a power loss.
  save (m: Meta): void {
    replaceFileDurably(this.files, this.dir, this.file, Buffer.from(JSON.stringify(m) + '\n'))
  }
}
