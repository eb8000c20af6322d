// Errors that cross the wire carry a stable code. Every code here is listed in protocol.md,
// section "Error codes"; the factories keep call sites short and the messages consistent.

export const ErrorCodes = [
  'BAD_JSON',
  'BAD_REQUEST',
  'UNKNOWN_OP',
  'NOT_LOGGED_IN',
  'USER_EXISTS',
  'AUTH_FAILED',
  'NO_SUCH_USER',
  'LINE_TOO_LONG',
  'STORAGE_ERROR',
  'STORE_FULL',
  'MAILBOX_FULL',
  'TOO_MANY_REQUESTS',
  'SHUTTING_DOWN',
  'NOT_PRIMARY',
  'UNAVAILABLE',
  'INTERNAL'
] as const

export type ErrorCode = typeof ErrorCodes[number]

export interface WireError {
  code: ErrorCode
  message: string
  [extra: string]: unknown
}

export class ChatError extends Error {
  readonly code: ErrorCode
  readonly extra: Record<string, unknown>

  constructor (code: ErrorCode, message: string, options: { cause?: unknown, extra?: Record<string, unknown> } = {}) {
    super(message, { cause: options.cause })
    this.name = 'ChatError'
    this.code = code
    this.extra = options.extra ?? {}
  }

  toWire (): WireError {
    return { ...this.extra, code: this.code, message: this.message }
  }
}

export const errors = {
  badJson: (detail: string) => new ChatError('BAD_JSON', `invalid JSON: ${detail}`),
  badRequest: (field: string, why: string) => new ChatError('BAD_REQUEST', `${field}: ${why}`, { extra: { field } }),
  unknownOp: (op: string) => new ChatError('UNKNOWN_OP', `unknown op ${JSON.stringify(op).slice(0, 80)}`),
  notLoggedIn: () => new ChatError('NOT_LOGGED_IN', 'log in first'),
  userExists: (user: string) => new ChatError('USER_EXISTS', `the name ${user} is taken`),
  authFailed: () => new ChatError('AUTH_FAILED', 'wrong user name or password'),
  noSuchUser: (user: string) => new ChatError('NO_SUCH_USER', `no user named ${user}`),
  lineTooLong: (limitBytes: number) => new ChatError('LINE_TOO_LONG', `line longer than ${limitBytes} bytes; closing the connection`),
  storage: (cause: unknown) => new ChatError('STORAGE_ERROR', `the write could not be made durable: ${describe(cause)}`, { cause }),
  storeFull: (quotaBytes: number) => new ChatError('STORE_FULL', `the server holds as much as its quota allows (${Math.round(quotaBytes / 1048576)} MiB); delete messages to make room`, { extra: { quota: quotaBytes } }),
  mailboxFull: (to: string, quotaBytes: number) => new ChatError('MAILBOX_FULL', `${to}'s mailbox holds as much as one may (${Math.round(quotaBytes / 1048576)} MiB); it takes more once messages in it are deleted`, { extra: { to, quota: quotaBytes } }),
  tooManyRequests: (why: string) => new ChatError('TOO_MANY_REQUESTS', why),
  shuttingDown: () => new ChatError('SHUTTING_DOWN', 'the server is shutting down; retry elsewhere'),
  notPrimary: (primary: string | null) => new ChatError('NOT_PRIMARY', primary ? `this server is a backup; the primary is ${primary}` : 'this server is a backup; the primary is unknown', { extra: { primary } }),
  unavailable: (why: string) => new ChatError('UNAVAILABLE', `${why}; nothing was applied, retry`),
  internal: (cause: unknown) => new ChatError('INTERNAL', `internal error: ${describe(cause)}`, { cause })
}

export function describe (e: unknown): string {
  if (e instanceof Error) return (e as NodeJS.ErrnoException).code ? `${(e as NodeJS.ErrnoException).code}: ${e.message}` : e.message
  return String(e)
}
