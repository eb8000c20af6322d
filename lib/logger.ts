// Operator log: one JSON line per event on stderr, each with a time, a level and a message.
// Stdout is reserved for the readiness line.

export type Level = 'debug' | 'info' | 'warn' | 'error'
export type LogFn = (level: Level, msg: string, fields?: Record<string, unknown>) => void

export function makeLogger (node: string, out: (line: string) => void = (l) => process.stderr.write(l)): LogFn {
  return (level, msg, fields = {}) => {
    out(JSON.stringify({ t: new Date().toISOString(), level, node, msg, ...fields }) + '\n')
  }
}
