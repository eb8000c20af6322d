// The data directory's format, in the file FORMAT: a server refuses a directory written in a
// format newer than it knows, rather than misread it. (A server from before this file existed
// cannot check it: it may take a binary record it does not know for a torn write and cut the log
// there. See the README's known limits.)
//
//   1  every record and snapshot chunk is JSON; directories from before FORMAT existed
//   2  sends in the log and mailboxes in snapshots are binary (see framing.ts)
//   3  the exactly-once table in snapshots, and read marks in the log, are binary too
//
// A directory in an older format is read as it is (the decoders still read every older layout)
// and marked with the current format before anything new is written to it.

import path from 'node:path'
import { type FileOps, replaceFileDurably } from './files.ts'

export const dataFormat = 3

const fileName = 'FORMAT'
const pattern = /^chainchat data format (\d+)\n$/

export class DataFormatError extends Error {
  constructor (readonly file: string, why: string) {
    super(`data directory format: ${file} ${why}; refusing to start`)
    this.name = 'DataFormatError'
  }
}

// Check the directory's format, and mark it with the current one if it is older or unmarked.
export function checkFormat (files: FileOps, dir: string): void {
  const file = path.join(dir, fileName)
  let text: string | null = null
  try {
    text = files.readFileSync(file).toString('utf8')
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
  }
  if (text !== null) {
    const m = pattern.exec(text)
    if (m === null) throw new DataFormatError(file, `is not a format line (${JSON.stringify(text.slice(0, 40))})`)
    const found = Number(m[1])
    if (found > dataFormat) throw new DataFormatError(file, `says format ${found}, and this server knows formats up to ${dataFormat}: it was written by a newer version`)
    if (found === dataFormat) return
  }
  replaceFileDurably(files, dir, file, Buffer.from(`chainchat data format ${dataFormat}\n`))
}
