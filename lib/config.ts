// Command-line flags -> a validated, frozen Config. A bad flag is a UsageError: the executable
// prints the usage and exits 2.

import { parseArgs } from 'node:util'
import path from 'node:path'
import { limits } from './limits.ts'

export interface Config {
  readonly host: string
  readonly port: number
  readonly data: string | null // null: ./data/<the port actually bound>
  readonly snapshotEveryRecords: number
  readonly snapshotEveryBytes: number
  readonly lineBytesMax: number
}

export class UsageError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'UsageError'
  }
}

export const usage = `usage: chainchat-server --port <n> [options]

  --port <n>                   TCP port to listen on (0 picks a free one)
  --host <addr>                address to listen on (default 127.0.0.1)
  --data <dir>                 data directory (default ./data/<port>)
  --snapshot-every-records <n> take a snapshot after this many log records (default ${limits.snapshotEveryRecords})
  --snapshot-every-bytes <n>   ... or after this many log bytes (default ${limits.snapshotEveryBytes})
  --line-bytes-max <n>         longest request line accepted (default ${limits.lineBytesMax})
  -h, --help                   show this help
`

function integer (name: string, v: string | undefined, min: number, max: number, fallback: number): number {
  if (v === undefined) return fallback
  if (!/^\d+$/.test(v)) throw new UsageError(`--${name} must be a whole number, not ${JSON.stringify(v)}`)
  const n = Number(v)
  if (n < min || n > max) throw new UsageError(`--${name} must be between ${min} and ${max}`)
  return n
}

export function parseConfig (argv: string[]): Config | 'help' {
  let values
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        port: { type: 'string' },
        host: { type: 'string' },
        data: { type: 'string' },
        'snapshot-every-records': { type: 'string' },
        'snapshot-every-bytes': { type: 'string' },
        'line-bytes-max': { type: 'string' },
        help: { type: 'boolean', short: 'h' }
      }
    }).values
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
  if (values.help) return 'help'
  if (values.port === undefined) throw new UsageError('--port is required')
  const port = integer('port', values.port, 0, 65535, 0)
  const host = values.host ?? '127.0.0.1'
  if (host === '') throw new UsageError('--host must not be empty')
  return Object.freeze({
    host,
    port,
    data: values.data === undefined ? null : path.resolve(values.data),
    snapshotEveryRecords: integer('snapshot-every-records', values['snapshot-every-records'], 1, Number.MAX_SAFE_INTEGER, limits.snapshotEveryRecords),
    snapshotEveryBytes: integer('snapshot-every-bytes', values['snapshot-every-bytes'], 1, Number.MAX_SAFE_INTEGER, limits.snapshotEveryBytes),
    lineBytesMax: integer('line-bytes-max', values['line-bytes-max'], 1024, 16 * 1024 * 1024, limits.lineBytesMax)
  })
}
