// `chainchat`: the interactive client. A readline REPL over a connection to the primary of a
// chain (or to a single server): slash commands come from a table, pushed messages and notices of
// failover are printed above the line being typed, and passwords are read without echo. What the session shows goes to stdout; only usage errors
// and a failed start go to stderr.

import readline from 'node:readline'
import { Writable } from 'node:stream'
import { parseArgs } from 'node:util'
import { ChatClient, RequestError, type Message } from '../client.ts'
import { userPattern, userPatternText } from '../protocol.ts'
import { UsageError, flagsOrExit } from '../config.ts'

const defaultServers = '127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003' // what `npm start` runs
// While the first connection is sought: after this long without a primary, say that we are waiting.
const connectNoticeMs = 1000
const historyCountDefault = 20 // one screenful
// Lines typed or piped ahead of the command that is running. Beyond this, reading pauses.
const typeAheadLinesMax = 1000

export const usage = `usage: chainchat [--server host:port[,host:port...]]

  --server <list>  the servers of the chain, comma-separated (default
                   ${defaultServers}); the client finds the
                   primary among them and follows it when another takes over
  -h, --help       show this help

Once connected, /help lists the commands.
`


export interface ServerAddress { host: string, port: number }

export function parseFlags (argv: string[]): { servers: ServerAddress[], help: boolean } {
  let values
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: { server: { type: 'string' }, help: { type: 'boolean', short: 'h' } }
    }).values
  } catch (e) {
    // parseArgs only throws for the user's mistakes: unknown flags, missing values, positionals.
    throw new UsageError((e as Error).message)
  }
  return { servers: parseServerList(values.server ?? defaultServers), help: values.help ?? false }
}

// "host:port,host:port"; an IPv6 host goes in brackets: [::1]:9001.
export function parseServerList (list: string): ServerAddress[] {
  const servers = list.split(',').map(s => s.trim()).filter(s => s !== '').map(text => {
    const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text)
    const port = m ? Number(m[3]) : 0
    if (!m || port < 1 || port > 65535) throw new UsageError(`--server: ${JSON.stringify(text)} is not host:port`)
    return { host: m[1] ?? m[2], port }
  })
  if (servers.length === 0) throw new UsageError('--server: give at least one host:port')
  return servers
}

const showAddress = (a: ServerAddress): string => a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`

// ---- the connection -----------------------------------------------------------------------------

// Open the session's connection: the client library asks the servers for the primary. Given
// several, it also finds the primary again when the connection is lost or the primary changes,
// logs back in and re-sends what was waiting for a reply; the session only tells the user.
export async function connect (servers: ServerAddress[]): Promise<ChatClient> {
  return await ChatClient.connect({ servers: servers.map(showAddress) })
}

// ---- the terminal -------------------------------------------------------------------------------

// Sits between readline and the real output so that everything readline writes can be dropped
// while a password is typed: echoed keys, but also the redraws and cursor moves it makes when a
// long line wraps. Writes complete synchronously, so they stay in order with direct writes.
class MutableOutput extends Writable {
  muted = false

  constructor (private readonly target: NodeJS.WriteStream) {
    super({ decodeStrings: false })
    target.on('resize', () => this.emit('resize')) // readline re-measures the line on resize
  }

  get columns (): number { return this.target.columns }
  get isTTY (): boolean { return this.target.isTTY }

  override _write (chunk: string | Buffer, _encoding: BufferEncoding, done: (e?: Error | null) => void): void {
    if (!this.muted) this.target.write(chunk)
    done()
  }
}

// The user's side of the session: lines in, one at a time and in order, and text out without
// garbling the line being typed.
export class Terminal {
  readonly interactive: boolean
  private readonly rl: readline.Interface
  private readonly muter: MutableOutput
  private readonly typedAhead: string[] = []
  private wakeReader: ((line: string | null) => void) | null = null
  private inputEnded = false
  private awaitingInput = false // a prompt is showing and a line is awaited
  private readingSecret = false
  private readonly heldBack: string[] = [] // printed while a secret was typed

  constructor (input: NodeJS.ReadStream, private readonly out: NodeJS.WriteStream) {
    // Terminal mode is what puts a TTY in raw mode; without it the TTY itself echoes what is
    // typed, passwords included. So decide by the input: a person typing at a TTY gets no echo
    // of a password even when the output goes to a file. Piped input is never echoed.
    this.interactive = input.isTTY === true
    this.muter = new MutableOutput(out)
    this.rl = readline.createInterface({ input, output: this.muter, terminal: this.interactive })
    this.rl.on('line', line => this.onLine(line))
    this.rl.on('close', () => {
      // Ctrl-D leaves the cursor after the prompt; give the shell a fresh line. (close() below
      // clears awaitingInput first, so this is only for the user's own end of input.)
      if (this.interactive && this.awaitingInput) this.out.write('\n')
      this.inputEnded = true
      this.awaitingInput = false
      this.deliver(null)
    })
    // A password must not come back with the up arrow.
    this.rl.on('history', history => { if (this.readingSecret) history.shift() })
  }

  // The next line, or null once the input has ended (Ctrl-D, or Ctrl-C, which readline turns
  // into a close; either ends the session). The prompt is shown only when we actually wait:
  // lines typed or piped ahead need none.
  readLine (prompt: string): Promise<string | null> {
    return this.read(prompt, false)
  }

  // Like readLine, without echo.
  readSecret (prompt: string): Promise<string | null> {
    return this.read(prompt, true)
  }

  private async read (prompt: string, secret: boolean): Promise<string | null> {
    this.rl.setPrompt(prompt)
    if (this.typedAhead.length > 0 || this.inputEnded) return this.nextLine()
    this.awaitingInput = true
    this.readingSecret = secret
    this.rl.prompt(true)
    this.muter.muted = secret
    try {
      return await this.nextLine()
    } finally {
      this.awaitingInput = false
      this.readingSecret = false
      if (secret) {
        this.muter.muted = false
        // readline's own newline after the secret was muted with the rest.
        if (this.interactive) this.out.write('\n')
        for (const text of this.heldBack.splice(0)) this.print(text)
      }
    }
  }

  private onLine (line: string): void {
    if (this.deliver(line)) return
    this.typedAhead.push(line)
    // readline still hands out the rest of a chunk already read, so this bounds the queue to
    // the limit plus one chunk.
    if (this.typedAhead.length >= typeAheadLinesMax) this.rl.pause()
  }

  private deliver (line: string | null): boolean {
    const wake = this.wakeReader
    if (!wake) return false
    this.wakeReader = null
    wake(line)
    return true
  }

  private nextLine (): Promise<string | null> {
    const line = this.typedAhead.shift()
    if (line !== undefined) {
      // resume() on a closed interface would start reading stdin again.
      if (this.typedAhead.length < typeAheadLinesMax / 2 && !this.inputEnded) this.rl.resume()
      return Promise.resolve(line)
    }
    if (this.inputEnded) return Promise.resolve(null)
    return new Promise(resolve => { this.wakeReader = resolve })
  }

  // Show the prompt `next` instead of `current` if `current` is the one in use; the next print
  // redraws it.
  replacePrompt (current: string, next: string): void {
    if (this.rl.getPrompt() === current) this.rl.setPrompt(next)
  }

  // Print text (one line or several) above the line being typed, then redraw the prompt and
  // the partial input with the cursor where it was. While a password is typed, the text waits:
  // printing would need a redraw, and the redraw would show the password.
  print (text: string): void {
    if (this.muter.muted) {
      this.heldBack.push(text)
      return
    }
    const redraw = this.awaitingInput && !this.inputEnded
    if (!this.interactive) {
      this.out.write(text + '\n')
      if (redraw) this.rl.prompt(true)
      return
    }
    // Erase from the prompt's first row down; the partial input may wrap over several rows.
    const { rows } = this.rl.getCursorPos()
    readline.moveCursor(this.out, 0, -rows)
    readline.cursorTo(this.out, 0)
    readline.clearScreenDown(this.out)
    this.out.write(text + '\n')
    // The input is erased and the cursor is at the start of a fresh row, so readline must not
    // climb before it redraws. It climbs by its private `prevRows`, which is not even kept
    // current when a paste wraps the line, so set it rather than predict it.
    const internals = this.rl as unknown as { prevRows: number }
    internals.prevRows = 0
    if (redraw) this.rl.prompt(true)
  }

  // Stop reading input; a line still awaited becomes null. The farewell, if any, takes the
  // place of the prompt.
  close (farewell?: string): void {
    this.awaitingInput = false
    if (farewell !== undefined) this.print(farewell)
    this.rl.close()
  }
}

// ---- the session ------------------------------------------------------------------------------

// Why a command could not run, in the user's terms: printed as `error: <message>`.
class InputError extends Error {}

// A command given the wrong number of arguments: printed as `usage: /name <args>`.
class UsageProblem extends Error {}

// The input ended while a command was asking for something: the command is abandoned and the
// session ends as at any end of input.
class InputEnded extends Error {}

export class Session {
  user: string | null = null
  private ended = false
  private exitCode = 0
  private deletingOwnAccount = false
  private lookingForPrimary = false

  constructor (readonly client: ChatClient, readonly terminal: Terminal) {
    client.on('message', (m: Message) => this.say(formatMessage(m)))
    client.on('account_deleted', () => this.onAccountDeleted())
    client.on('reconnecting', (reason: string) => this.onReconnecting(reason))
    client.on('reconnected', (address: string) => this.onReconnected(address))
    client.on('relogin_failed', (e: unknown) => this.onReloginFailed(e))
    client.on('close', () => this.onConnectionClosed())
  }

  // The server the client is connected to now (or was, while it looks for the primary).
  get server (): string { return this.client.address }

  prompt (): string { return `${this.user ?? 'chainchat'}> ` }

  say (text: string): void { this.terminal.print(text) }

  async askSecret (prompt: string): Promise<string> {
    const line = await this.terminal.readSecret(prompt)
    if (line === null) throw new InputEnded()
    return line
  }

  async confirm (question: string): Promise<boolean> {
    const line = await this.terminal.readLine(question)
    if (line === null) throw new InputEnded()
    return /^\s*y(es)?\s*$/i.test(line)
  }

  // Read and run commands until /quit, the end of input or the loss of the connection; resolve
  // with the exit code.
  async run (): Promise<number> {
    this.say(`connected to ${this.server}; /help lists the commands`)
    while (!this.ended) {
      const line = await this.terminal.readLine(this.prompt())
      if (line === null) break
      await this.execute(line)
    }
    this.ended = true // before closing, so our own close is not taken for a lost connection
    this.client.close()
    this.terminal.close()
    return this.exitCode
  }

  // Make the loop stop after the command that is running.
  quit (): void { this.ended = true }

  private async execute (line: string): Promise<void> {
    const m = /^\s*\/(\S*)\s*(.*)$/s.exec(line)
    if (!m) {
      if (line.trim() !== '') this.say('to send a message, use /send <user> <text>; /help lists the commands')
      return
    }
    const [, name, argText] = m
    const command = Object.hasOwn(commands, name) ? commands[name] : undefined
    if (!command) {
      this.say(`unknown command /${name}; /help lists the commands`)
      return
    }
    try {
      await command.run(this, new Args(argText, `/${name} ${command.usage}`.trim()))
    } catch (e) {
      if (e instanceof InputEnded) return // the loop sees the end of input next
      this.say(describeError(e))
    }
  }

  private onAccountDeleted (): void {
    // Our own /delete-account reports the deletion itself (the event may come before its reply).
    if (this.deletingOwnAccount || this.user === null) return
    const before = this.prompt()
    const name = this.user
    this.user = null
    this.terminal.replacePrompt(before, this.prompt())
    this.say(`the account ${name} was deleted by another session; you are logged out`)
  }

  // The connection was lost or the server stopped being the primary: the client looks for the
  // primary. Commands typed meanwhile wait; the ones in flight are re-sent once it is found.
  private onReconnecting (reason: string): void {
    if (this.ended) return
    const why = reason === 'NOT_PRIMARY'
      ? `${this.server} is no longer the primary`
      : reason === 'UNAVAILABLE' || reason === 'SHUTTING_DOWN'
        ? `${this.server} cannot serve now (${reason})`
        : reason === 'connection closed' ? `connection to ${this.server} lost` : reason
    this.lookingForPrimary = true
    this.say(`${why}; looking for the primary...`)
  }

  private onReconnected (address: string): void {
    this.lookingForPrimary = false
    if (this.ended) return
    this.say(`reconnected to ${address}${this.user === null ? '' : `, logged in as ${this.user}`}`)
  }

  // After a failover the client logs in again with the password of the last login; if that
  // fails (the account was deleted meanwhile, say), this connection is logged out.
  private onReloginFailed (e: unknown): void {
    if (this.ended || this.user === null) return
    const before = this.prompt()
    const name = this.user
    this.user = null
    this.terminal.replacePrompt(before, this.prompt())
    this.say(`could not log in again as ${name} (${describeError(e).replace(/^error: /, '')}); you are logged out`)
  }

  // The connection closed and no server could take over (or, with one server, it closed): the
  // session ends with exit code 1.
  private onConnectionClosed (): void {
    if (this.ended) return
    this.ended = true
    this.exitCode = 1
    // Ends a wait for input; a request in flight fails with CONNECTION_LOST and says so.
    this.terminal.close(this.lookingForPrimary ? 'no server answered as the primary in time; the session ends' : `connection to ${this.server} closed`)
  }

  async deleteOwnAccount (password: string): Promise<void> {
    this.deletingOwnAccount = true
    try {
      await this.client.deleteAccount(password)
    } finally {
      this.deletingOwnAccount = false
    }
  }
}

// A command's arguments: white-space separated words, and the raw text after some of them.
class Args {
  readonly words: string[]

  constructor (private readonly text: string, readonly usage: string) {
    this.words = text.split(/\s+/).filter(w => w !== '')
  }

  // Fail with the usage unless the word count is within bounds.
  expect (min: number, max = Infinity): void {
    if (this.words.length < min || this.words.length > max) throw new UsageProblem(`usage: ${this.usage}`)
  }

  // The text after the first n words, its spacing kept: a message as typed.
  after (n: number): string {
    const m = new RegExp(`^\\s*(?:\\S+\\s+){${n}}`).exec(this.text)
    return m ? this.text.slice(m[0].length) : ''
  }

  user (i: number): string {
    const name = this.words[i]
    if (!userPattern.test(name)) throw new InputError(`${JSON.stringify(name)} is not a user name (${userPatternText})`)
    return name
  }

  // An optional whole number at word i, at least `min`; a leading # is allowed, as ids are shown.
  count (i: number, what: string, min: number): number | undefined {
    const word = this.words[i]
    if (word === undefined) return undefined
    const n = /^#?\d{1,15}$/.test(word) ? Number(word.replace('#', '')) : NaN
    if (!(n >= min)) throw new InputError(`${what} must be a whole number of at least ${min}, not ${JSON.stringify(word)}`)
    return n
  }
}

// ---- the commands -------------------------------------------------------------------------------

interface Command {
  usage: string // the arguments, after the name
  help: string
  run: (s: Session, a: Args) => Promise<void>
}

const commands: Record<string, Command> = {
  register: {
    usage: '<user>',
    help: 'create an account (asks for a password twice) and log in',
    run: async (s, a) => {
      a.expect(1, 1)
      const user = a.user(0)
      const password = await s.askSecret('choose a password: ')
      if (password === '') throw new InputError('the password must not be empty; nothing was registered')
      if (await s.askSecret('repeat the password: ') !== password) throw new InputError('the passwords differ; nothing was registered')
      try {
        await s.client.register(user, password)
      } catch (e) {
        if (!(e instanceof RequestError) || e.code !== 'USER_EXISTS') throw e
        s.say(describeError(e))
        if (await s.confirm(`log in as ${user} instead? [y/N] `)) await logIn(s, user)
        return
      }
      s.say(`registered ${user}`)
      await logIn(s, user, password)
    }
  },
  login: {
    usage: '<user>',
    help: 'log in (asks for the password)',
    run: async (s, a) => {
      a.expect(1, 1)
      await logIn(s, a.user(0))
    }
  },
  users: {
    usage: '[pattern] [offset] [limit]',
    help: 'list users whose names match the pattern (* and ? wildcards; default *)',
    run: async (s, a) => {
      a.expect(0, 3)
      const pattern = a.words[0] ?? '*'
      const offset = a.count(1, 'offset', 0) ?? 0
      const { users, total } = await s.client.users(pattern, { offset, limit: a.count(2, 'limit', 1) })
      if (users.length === 0) s.say(total === 0 ? `no users match ${pattern}` : `no users past ${offset} (${total} match ${pattern})`)
      else if (users.length === total) s.say(`${total} ${plural(total, 'user')}: ${users.join(', ')}`)
      else s.say(`users ${offset + 1}-${offset + users.length} of ${total}: ${users.join(', ')}`)
    }
  },
  send: {
    usage: '<user> <text...>',
    help: 'send a message',
    run: async (s, a) => {
      a.expect(2)
      const to = a.user(0)
      const { message, delivered } = await s.client.send(to, a.after(1))
      s.say(delivered ? `sent to ${message.to} (#${message.id})` : `sent to ${message.to} (#${message.id}); not logged in, it waits unread`)
    }
  },
  read: {
    usage: '[n]',
    help: 'fetch up to n unread messages, oldest first (default 10), and mark them read',
    run: async (s, a) => {
      a.expect(0, 1)
      const { messages, remaining } = await s.client.read(a.count(0, 'n', 1))
      if (messages.length === 0) s.say('no unread messages')
      for (const m of messages) s.say(formatMessage(m))
      if (remaining > 0) s.say(`${remaining} more unread; /read to fetch them`)
    }
  },
  history: {
    usage: '[n] [before-id]',
    help: `show the last n messages, read or not (default ${historyCountDefault}), older than before-id if given`,
    run: async (s, a) => {
      a.expect(0, 2)
      const limit = a.count(0, 'n', 1) ?? historyCountDefault
      const before = a.count(1, 'before-id', 1)
      const { messages } = await s.client.history({ limit, before })
      if (messages.length === 0) s.say(before === undefined ? 'no messages' : `no messages before #${before}`)
      // The server sends newest first; a conversation reads top to bottom.
      for (const m of [...messages].reverse()) s.say(formatMessage(m))
      if (messages.length === limit) s.say(`older: /history ${limit} ${messages[messages.length - 1].id}`)
    }
  },
  delete: {
    usage: '<id> [id...]',
    help: 'delete messages from your mailbox',
    run: async (s, a) => {
      a.expect(1)
      const ids = a.words.map((_, i) => a.count(i, 'a message id', 1)!)
      const { deleted, missing } = await s.client.deleteMessages(ids)
      s.say(`deleted ${deleted} ${plural(deleted, 'message')}`)
      if (missing.length > 0) s.say(`not found: ${missing.map(id => `#${id}`).join(', ')}`)
    }
  },
  logout: {
    usage: '',
    help: 'log out',
    run: async (s, a) => {
      a.expect(0, 0)
      await s.client.logout()
      s.user = null
      s.say('logged out')
    }
  },
  'delete-account': {
    usage: '',
    help: 'delete your account and all its messages (asks for the password)',
    run: async (s, a) => {
      a.expect(0, 0)
      const user = s.user
      if (user === null) throw new InputError('log in first')
      const password = await s.askSecret('password: ')
      if (!await s.confirm(`delete the account ${user} and all its messages for good? [y/N] `)) {
        s.say('the account stays')
        return
      }
      await s.deleteOwnAccount(password)
      s.user = null
      s.say(`deleted the account ${user}; you are logged out`)
    }
  },
  status: {
    usage: '',
    help: 'show the connection and the server\'s status',
    run: async (s, a) => {
      a.expect(0, 0)
      const status = await s.client.status()
      s.say(`connected to ${s.server}, ${s.user === null ? 'not logged in' : `logged in as ${s.user}`}`)
      for (const [key, value] of Object.entries(status)) {
        if (key === 'ok' || key === 'id') continue
        s.say(`  ${key}: ${Array.isArray(value) ? value.join(', ') : String(value)}`)
      }
    }
  },
  help: {
    usage: '',
    help: 'list the commands',
    run: async (s) => {
      const lines = Object.entries(commands).map(([name, c]) => [`/${name} ${c.usage}`.trim(), c.help])
      const width = Math.max(...lines.map(([u]) => u.length))
      s.say(lines.map(([u, h]) => `  ${u.padEnd(width)}  ${h}`).join('\n'))
    }
  },
  quit: {
    usage: '',
    help: 'close the connection and exit',
    run: async (s) => { s.quit() }
  }
}

// Ask for the password (unless it was just chosen at /register) and log in.
async function logIn (s: Session, user: string, password?: string): Promise<void> {
  const result = await s.client.login(user, password ?? await s.askSecret('password: '))
  s.user = result.user
  s.say(`logged in as ${result.user}`)
  s.say(result.unread === 0 ? 'no unread messages' : `${result.unread} unread ${plural(result.unread, 'message')}; /read to fetch ${result.unread === 1 ? 'it' : 'them'}`)
}

// ---- formatting -------------------------------------------------------------------------------

const plural = (n: number, word: string): string => n === 1 ? word : word + 's'
const pad2 = (n: number): string => String(n).padStart(2, '0')

// `[12:03] alice: hello (#42)`; messages from another day carry the date too.
export function formatMessage (m: Message, now = new Date()): string {
  const d = new Date(m.ts)
  let when = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`
  if (d.toDateString() !== now.toDateString()) when = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${when}`
  return `[${when}] ${m.from}: ${printable(m.text)} (#${m.id})`
}

// Message text is shown as text, never obeyed as terminal control: a sender could otherwise
// move the cursor, clear the screen or fake other lines with escape sequences. Line breaks stay,
// indented so that a continuation cannot pass for a message of its own.
function printable (text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, c => c === '\n' ? '\n    ' : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

function describeError (e: unknown): string {
  if (e instanceof UsageProblem) return e.message
  if (e instanceof InputError) return `error: ${e.message}`
  const code = (e as { code?: unknown }).code
  const message = e instanceof Error ? e.message : String(e)
  return typeof code === 'string' ? `error: ${message} (${code})` : `error: ${message}`
}

// ---- the executable ---------------------------------------------------------------------------

export async function main (argv: string[]): Promise<void> {
  const flags = flagsOrExit('chainchat', usage, () => parseFlags(argv))
  if (!flags) return
  const list = flags.servers.map(showAddress).join(', ')
  // With several servers the client keeps trying for a while (a chain may be electing a
  // primary); say so rather than sit silent.
  const notice = setTimeout(() => process.stdout.write(`${flags.servers.length === 1 ? `still connecting to ${list}` : `still looking for the primary among ${list}`} (Ctrl-C gives up)\n`), connectNoticeMs)
  let client
  try {
    client = await connect(flags.servers)
  } catch (e) {
    process.stderr.write(`chainchat: cannot connect to ${flags.servers.length === 1 ? list : `any of ${list}`}: ${(e as Error).message}\n`)
    process.exitCode = 1
    return
  } finally {
    clearTimeout(notice)
  }
  const session = new Session(client, new Terminal(process.stdin, process.stdout))
  process.exitCode = await session.run()
}
