// `chainchat-server`: parse flags, start the node, print the readiness line, handle signals.

import { parseConfig, usage, UsageError } from '../config.ts'
import { startNode } from '../node.ts'
import { makeLogger } from '../logger.ts'
import { DataDirLockedError } from '../storage/lock.ts'

export async function main (argv: string[]): Promise<void> {
  let config
  try {
    config = parseConfig(argv)
  } catch (e) {
    if (!(e instanceof UsageError)) throw e
    process.stderr.write(`chainchat-server: ${e.message}\n\n${usage}`)
    process.exit(2)
  }
  if (config === 'help') {
    process.stdout.write(usage)
    return
  }
  const log = makeLogger(`${config.host}:${config.port}`)
  const fatal = (e: Error): void => {
    log('error', 'fatal', { error: e.message })
    process.exit(1)
  }
  let node
  try {
    // Which code runs: lib/ itself (through tsx), or its compiled build (bin/load.js).
    const code = import.meta.url.endsWith('.ts') ? 'lib' : 'build'
    node = await startNode(config, { log, onFatal: fatal, code })
  } catch (e) {
    const err = e as Error
    const known = err instanceof DataDirLockedError || err.name === 'CorruptLogError' || err.name === 'CorruptSnapshotError' || err.name === 'DataFormatError' || (err as NodeJS.ErrnoException).code === 'EADDRINUSE'
    log('error', 'could not start', { error: err.message, ...(known ? {} : { stack: err.stack }) })
    process.stderr.write(`chainchat-server: ${err.message}\n`)
    process.exit(1)
  }
  process.stdout.write(JSON.stringify({ event: 'listening', host: node.address.host, port: node.address.port }) + '\n')
  let signals = 0
  const stop = (signal: string): void => {
    if (++signals > 1) {
      log('warn', 'second signal: exiting at once', { signal })
      process.exit(1)
    }
    node.shutdown(signal).then(() => process.exit(0), (e) => fatal(e as Error))
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}
