// The command table (protocol.md, "Operations"): for every op, whether it writes to the log
// (`mutates`, so it is logged and replicated), whether it needs a login, and how its fields are
// validated. One glance tells which commands change replicated state.

import { errors } from './errors.ts'
import { limits } from './limits.ts'
import { intField, optionalField, stringField, userPattern, userPatternText } from './protocol.ts'

export interface CommandSpec<P> {
  mutates: boolean
  needsLogin: boolean
  // Mutations whose preparation is synchronous may be submitted while earlier requests on the
  // same connection are still in flight; the rest wait for their predecessors to finish.
  pipelined: boolean
  parse: (f: Record<string, unknown>) => P
}

const user = (f: Record<string, unknown>, name = 'user'): string =>
  stringField(f, name, { maxBytes: limits.userLengthMax, pattern: userPattern, patternText: userPatternText })!
const password = (f: Record<string, unknown>): string => stringField(f, 'password', { maxBytes: limits.passwordBytesMax })!

function rid (f: Record<string, unknown>): string | undefined {
  return stringField(f, 'rid', { maxBytes: limits.ridLengthMax, optional: true })
}

function ids (f: Record<string, unknown>): number[] {
  const v = optionalField(f, 'ids')
  if (!Array.isArray(v)) throw errors.badRequest('ids', v === undefined ? 'required' : 'must be an array of message ids')
  if (v.length > limits.deleteIdsMax) throw errors.badRequest('ids', `at most ${limits.deleteIdsMax} ids`)
  for (const x of v) if (typeof x !== 'number' || !Number.isSafeInteger(x) || x < 1) throw errors.badRequest('ids', 'each id must be a positive integer')
  return v as number[]
}

function flag (f: Record<string, unknown>, name: string, dflt: boolean): boolean {
  const v = optionalField(f, name)
  if (v === undefined) return dflt
  if (typeof v !== 'boolean') throw errors.badRequest(name, 'must be true or false')
  return v
}

function spec<P> (s: CommandSpec<P>): CommandSpec<P> { return s }

export const commands = {
  register: spec({ mutates: true, needsLogin: false, pipelined: false, parse: f => ({ user: user(f), password: password(f), rid: rid(f) }) }),
  login: spec({ mutates: false, needsLogin: false, pipelined: false, parse: f => ({ user: user(f), password: password(f) }) }),
  logout: spec({ mutates: false, needsLogin: true, pipelined: false, parse: () => ({}) }),
  users: spec({
    mutates: false,
    needsLogin: false,
    pipelined: false,
    parse: f => ({
      pattern: stringField(f, 'pattern', { maxBytes: limits.patternLengthMax, optional: true, pattern: /^[A-Za-z0-9_.\-*?]*$/, patternText: 'name characters with * and ? wildcards' }) ?? '*',
      offset: intField(f, 'offset', { min: 0, max: Number.MAX_SAFE_INTEGER, default: 0 }),
      limit: intField(f, 'limit', { min: 1, max: limits.usersLimitMax, default: limits.usersLimitDefault })
    })
  }),
  send: spec({
    mutates: true,
    needsLogin: true,
    pipelined: true,
    parse: f => ({ to: user(f, 'to'), text: stringField(f, 'text', { maxBytes: limits.textBytesMax })!, rid: rid(f) })
  }),
  read: spec({ mutates: true, needsLogin: true, pipelined: true, parse: f => ({ limit: intField(f, 'limit', { min: 1, max: limits.readLimitMax, default: limits.readLimitDefault }), rid: rid(f) }) }),
  history: spec({
    mutates: false,
    needsLogin: true,
    pipelined: false,
    parse: f => ({
      limit: intField(f, 'limit', { min: 1, max: limits.historyLimitMax, default: limits.historyLimitDefault }),
      before: optionalField(f, 'before') === undefined ? undefined : intField(f, 'before', { min: 1, max: Number.MAX_SAFE_INTEGER, default: 0 })
    })
  }),
  delete_messages: spec({ mutates: true, needsLogin: true, pipelined: true, parse: f => ({ ids: ids(f), rid: rid(f) }) }),
  delete_account: spec({ mutates: true, needsLogin: true, pipelined: false, parse: f => ({ password: password(f), rid: rid(f) }) }),
  ping: spec({ mutates: false, needsLogin: false, pipelined: false, parse: () => ({}) }),
  status: spec({ mutates: false, needsLogin: false, pipelined: false, parse: f => ({ digest: flag(f, 'digest', true) }) })
} as const

export type Op = keyof typeof commands
export type Params<O extends Op> = ReturnType<typeof commands[O]['parse']>

export function isOp (op: string): op is Op {
  return Object.hasOwn(commands, op)
}
