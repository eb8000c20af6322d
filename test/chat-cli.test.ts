// The interactive client as a user meets it: `node bin/chat.js` as a child process against a
// real server, driven by writing lines to its stdin and reading its stdout. Every wait has a
// deadline and polls for the expected text; nothing sleeps hoping the CLI is ready.

import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import { ChatClient, type Message } from '../lib/client.ts'
import { root, startServer, tmpDir, waitFor, type Teardown } from './helpers/spawn.ts'
import { Chain } from './helpers/chain.ts'

const chatBin = path.join(root, 'bin/chat.js')
const expectTimeoutMs = 10_000

// A running CLI and everything it printed. expect() looks only at output after the previous
// match, so each expectation is about what the last command did, not about older text.
class Cli {
  out = ''
  err = ''
  private seen = 0
  readonly exited: Promise<number | null>

  private constructor (readonly proc: ChildProcess) {
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => { this.out += d })
    proc.stderr!.setEncoding('utf8').on('data', (d: string) => { this.err += d })
    proc.stdin!.on('error', () => { /* the CLI may exit before reading everything */ })
    this.exited = new Promise(resolve => proc.on('exit', code => resolve(code)))
  }

  static start (t: Teardown, args: string[]): Cli {
    return Cli.track(t, spawn(process.execPath, [chatBin, ...args], { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] }))
  }

  // Run the CLI under `script`, which gives it a pseudo-terminal: readline's raw mode, echo
  // and redraws then happen as they would for a person at a terminal.
  static startInTerminal (t: Teardown, args: string[]): Cli {
    const command = 'exec ' + [process.execPath, chatBin, ...args].map(a => `'${a}'`).join(' ')
    return Cli.track(t, spawn('script', ['-qfec', command, '/dev/null'], { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] }))
  }

  private static track (t: Teardown, proc: ChildProcess): Cli {
    const cli = new Cli(proc)
    t.teardown(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
    return cli
  }

  type (...lines: string[]): void {
    for (const line of lines) this.proc.stdin!.write(line + '\n')
  }

  // Keys as typed at a terminal: no newline unless given ("\r" is the Enter key).
  keys (text: string): void { this.proc.stdin!.write(text) }

  async expect (pattern: string | RegExp, timeoutMs = expectTimeoutMs): Promise<RegExpExecArray> {
    const re = typeof pattern === 'string' ? new RegExp(pattern.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')) : pattern
    const m = await waitFor(() => {
      const found = re.exec(this.out.slice(this.seen))
      if (found) return found
      throw new Error(`not yet; output after the last match:\n${this.out.slice(this.seen).slice(-1500)}\nstderr: ${this.err.slice(-500)}`)
    }, timeoutMs, `${re} in the CLI's output`)
    this.seen += m.index + m[0].length
    return m
  }

  // Everything printed from here up to `marker` (the output of the commands typed before the
  // command that prints the marker).
  async outputUntil (marker: string): Promise<string> {
    return (await this.expect(new RegExp(`([^]*?)${marker.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`)))[1]
  }
}

async function user (t: Teardown, port: number, name: string, password: string): Promise<ChatClient & { inbox: Message[] }> {
  const c = await ChatClient.connect({ port })
  t.teardown(() => c.close())
  await c.register(name, password)
  await c.login(name, password)
  const inbox: Message[] = []
  c.on('message', (m: Message) => inbox.push(m))
  return Object.assign(c, { inbox })
}

const server = await startServer(t, { data: tmpDir(t, 'cli') })
const serverFlag = ['--server', `127.0.0.1:${server.port}`]

t.test('a bad flag prints the usage and exits 2', async t => {
  for (const args of [['--bogus'], ['--server', 'no-port-here'], ['stray-argument']]) {
    const cli = Cli.start(t, args)
    t.equal(await cli.exited, 2, `${args.join(' ')} exits 2`)
    t.match(cli.err, /usage: chainchat \[--server/, 'and prints the usage to stderr')
  }
})

t.test('a session: register, pushes both ways, read, users, history, delete, errors', async t => {
  const bob = await user(t, server.port, 'bob', 'pw-bob')
  // Of a list of servers, the client takes the first that serves; the others are for failover.
  const cli = Cli.start(t, ['--server', `127.0.0.1:${server.port},127.0.0.1:1`])
  await cli.expect(`connected to 127.0.0.1:${server.port}`)
  await cli.expect('chainchat> ')

  cli.type('hello there')
  await cli.expect('to send a message, use /send <user> <text>')
  cli.type('/frobnicate')
  await cli.expect('unknown command /frobnicate')

  // /register asks for the password twice (piped here) and logs in.
  cli.type('/register alice', 'pw-alice', 'pw-alice')
  await cli.expect('registered alice\nlogged in as alice\nno unread messages\n')
  await cli.expect('alice> ')
  t.notMatch(cli.out, 'pw-alice', 'the password is never printed')

  // A message pushed while alice is logged in appears as it arrives.
  const toAlice = await bob.send('alice', 'hello alice')
  t.equal(toAlice.delivered, true)
  await cli.expect(new RegExp(`\\[\\d\\d:\\d\\d\\] bob: hello alice \\(#${toAlice.message.id}\\)\n`))

  // /send keeps the text as typed, and bob, logged in, gets it pushed.
  cli.type('/send bob hi  bob, spaces kept')
  const sent = await cli.expect(/sent to bob \(#(\d+)\)\n/)
  const pushed = await waitFor(() => bob.inbox.find(m => m.text === 'hi  bob, spaces kept'), expectTimeoutMs, 'the push to bob')
  t.equal(pushed.from, 'alice')
  t.equal(pushed.id, Number(sent[1]), 'the CLI shows the id of the message sent')
  cli.type('/send nobody hi')
  await cli.expect('error: no user named nobody (NO_SUCH_USER)')
  cli.type('/send bob')
  await cli.expect('usage: /send <user> <text...>')

  // Messages sent while alice is away wait; login counts them and /read fetches them in order.
  cli.type('/logout')
  await cli.expect('logged out\n')
  await cli.expect('chainchat> ')
  for (const text of ['unread one', 'unread two']) t.equal((await bob.send('alice', text)).delivered, false)
  cli.type('/login alice', 'pw-alice')
  await cli.expect('logged in as alice\n2 unread messages; /read to fetch them\n')
  cli.type('/read 1')
  const one = await cli.expect(/\] bob: unread one \(#(\d+)\)\n1 more unread; \/read to fetch them\n/)
  cli.type('/read')
  await cli.expect(/\] bob: unread two \(#\d+\)\n/)
  cli.type('/read')
  await cli.expect('no unread messages')
  cli.type('/read zero')
  await cli.expect('error: n must be a whole number of at least 1, not "zero"')

  cli.type('/users')
  t.equal((await cli.expect(/\n?(\d+ users?: .*)\n/))[1], '2 users: alice, bob')
  cli.type('/users B*')
  t.equal((await cli.expect(/(\d+ users?: .*)\n/))[1], '1 user: bob', 'a pattern narrows the list')
  cli.type('/users * 1 1')
  await cli.expect('users 2-2 of 2: bob\n')

  // /history shows the mailbox oldest first, read or not.
  cli.type('/history', '/users alice')
  const history = await cli.outputUntil('1 user: alice')
  t.match(history, /bob: hello alice \(#\d+\)\n.*bob: unread one \(#\d+\)\n.*bob: unread two \(#\d+\)\n/, 'history in order')
  cli.type('/history 1')
  await cli.expect(/bob: unread two \(#\d+\)\nolder: \/history 1 \d+\n/)

  cli.type(`/delete #${one[1]} 999999`)
  await cli.expect('deleted 1 message\nnot found: #999999\n')
  cli.type('/history', '/users alice')
  const afterDelete = await cli.outputUntil('1 user: alice')
  t.match(afterDelete, 'unread two')
  t.notMatch(afterDelete, 'unread one', 'the deleted message is gone')

  cli.type('/status')
  await cli.expect(`connected to 127.0.0.1:${server.port}, logged in as alice\n`)
  await cli.expect(/ {2}digest: [0-9a-f]{16}\n/)

  cli.type('/login alice', 'not-the-password')
  await cli.expect('error: wrong user name or password (AUTH_FAILED)')

  // A taken name: the CLI offers to log in instead. First declined, then accepted.
  cli.type('/register BOB', 'x', 'x')
  await cli.expect('error: the name BOB is taken (USER_EXISTS)\n')
  await cli.expect('log in as BOB instead? [y/N] ')
  cli.type('n')
  await cli.expect('alice> ')
  cli.type('/register bob', 'x', 'x')
  await cli.expect('log in as bob instead? [y/N] ')
  cli.type('y')
  await cli.expect('password: ')
  cli.type('pw-bob')
  await cli.expect('logged in as bob\n')
  await cli.expect('bob> ')

  cli.type('/quit')
  t.equal(await cli.exited, 0, '/quit exits 0')
})

t.test('account deletion: by another session, and by /delete-account', async t => {
  const carol = await user(t, server.port, 'carol', 'pw-carol')
  await carol.register('dave', 'pw-dave')
  const cli = Cli.start(t, serverFlag)
  cli.type('/login carol', 'pw-carol')
  await cli.expect('logged in as carol')
  await cli.expect('carol> ')
  await carol.deleteAccount('pw-carol')
  await cli.expect('the account carol was deleted by another session; you are logged out\n')
  await cli.expect('chainchat> ')

  cli.type('/login dave', 'pw-dave')
  await cli.expect('logged in as dave')
  cli.type('/delete-account', 'pw-dave')
  await cli.expect('delete the account dave and all its messages for good? [y/N] ')
  cli.type('no')
  await cli.expect('the account stays\n')
  cli.type('/delete-account', 'pw-dave')
  await cli.expect('for good? [y/N] ')
  cli.type('y')
  await cli.expect('deleted the account dave; you are logged out\n')
  const check = await ChatClient.connect({ port: server.port })
  t.teardown(() => check.close())
  await t.rejects(check.login('dave', 'pw-dave'), { code: 'AUTH_FAILED' }, 'dave is gone')

  // The end of input (Ctrl-D at a terminal) closes the connection and exits 0.
  cli.proc.stdin!.end()
  t.equal(await cli.exited, 0, 'EOF exits 0')
})

t.test('a lost connection is reported and exits 1', async t => {
  const doomed = await startServer(t, { data: tmpDir(t, 'cli-doomed') })
  const cli = Cli.start(t, ['--server', `127.0.0.1:${doomed.port}`])
  await cli.expect('chainchat> ')
  doomed.kill('SIGKILL')
  await cli.expect(`connection to 127.0.0.1:${doomed.port} closed`)
  t.equal(await cli.exited, 1)
})

t.test('with a chain: the session follows the primary when it is killed', async t => {
  const chain = await Chain.create(t)
  await chain.startAll()
  const { primary } = await chain.waitConverged(3)
  const setup = await ChatClient.connect({ servers: chain.servers })
  t.teardown(() => setup.close())
  await setup.register('gus', 'pw-gus')
  await setup.register('hal', 'pw-hal')
  setup.close()

  // The backups come first in the list: the client asks them and is sent to the primary.
  const cli = Cli.start(t, ['--server', [...chain.servers].reverse().join(',')])
  await cli.expect(`connected to ${chain.servers[primary]}`)
  cli.type('/login hal', 'pw-hal')
  await cli.expect('logged in as hal\n')
  await cli.expect('hal> ')

  await chain.kill(primary)
  await cli.expect(`connection to ${chain.servers[primary]} lost; looking for the primary...\n`)
  const [, now] = await cli.expect(/reconnected to (\S+), logged in as hal\n/, 30_000)
  t.not(now, chain.servers[primary], 'to another server')
  t.ok(chain.servers.includes(now), 'one of the chain')

  // The session goes on, logged in again: a send succeeds and reaches gus.
  cli.type('/send gus after the failover')
  const [, id] = await cli.expect(/sent to gus \(#(\d+)\)/)
  const gus = await ChatClient.connect({ servers: chain.servers })
  t.teardown(() => gus.close())
  await gus.login('gus', 'pw-gus')
  const { messages } = await gus.history()
  t.match(messages.find(m => m.text === 'after the failover'), { from: 'hal', id: Number(id) }, 'the message arrived')

  cli.type('/quit')
  t.equal(await cli.exited, 0, 'and /quit still exits 0')
  console.error('DEBUG', JSON.stringify(cli.out))
})

// At a real (pseudo-)terminal: typed keys are echoed by readline, except a password; a push
// arriving mid-line is printed on a cleared line and the partial input is drawn again below it.
// Cursor moves, erasures (ESC [ ... letter) and carriage returns, as readline writes them.
// eslint-disable-next-line no-control-regex
const controls = /(?:\u001b\[[0-9;]*[A-Za-z]|\r)*/.source
const haveScript = process.platform === 'linux' && fs.existsSync('/usr/bin/script')
t.test('at a terminal: no password echo, pushes do not garble the line being typed', { skip: haveScript ? false : 'needs util-linux script' }, async t => {
  const erin = await user(t, server.port, 'erin', 'pw-erin')
  await erin.register('frank', 'sekrit-frank')
  const cli = Cli.startInTerminal(t, serverFlag)
  await cli.expect('chainchat> ')
  cli.keys('/login frank\r')
  await cli.expect('/login frank') // echoed: the terminal shows what is typed...
  await cli.expect('password: ')
  cli.keys('sekrit-frank\r')
  await cli.expect('logged in as frank')
  t.notMatch(cli.out, 'sekrit', '...but not the password')

  cli.keys('/send erin half-typed')
  await cli.expect('half-typed')
  await erin.send('frank', 'pushed while typing')
  // Only control sequences may come between the partial line and the push, and between the
  // push and the partial line drawn again.
  const push = await cli.expect(new RegExp(`^(${controls})\\[\\d\\d:\\d\\d\\] erin: pushed while typing \\(#\\d+\\)\r?\n${controls}frank> /send erin half-typed`))
  t.ok(push[1].includes('\u001b[1G') || push[1].includes('\r'), 'the push starts at the left edge...')
  t.ok(/\[0?J|\[2?K/.test(push[1]), '...of a cleared line')
  cli.keys(' and finished\r')
  const got = await waitFor(() => erin.inbox.find(m => m.text.startsWith('half-typed')), expectTimeoutMs, 'the finished message')
  t.equal(got.text, 'half-typed and finished', 'the partial input survived the push')
})
