// `chainchat-admin remove <host:port> --servers <h:p,...>`: remove a member from a running chain
// on purpose. It speaks the peer protocol, so it needs the chain's secret (--secret-file or
// CHAINCHAT_SECRET; none for a chain running without one, from a loopback address).

import fs from 'node:fs'
import { parseArgs } from 'node:util'
import { connectPeer, type PeerMessage, type PeerSocket } from '../replication/peer.ts'

const usage = `usage: chainchat-admin remove <host:port> --servers <h:p,h:p,...> [--secret-file <file>]

  remove <member>     take a member out of the chain; it retires and stays out until it is
                      started again with --join
  --servers <list>    members to ask; the primary is found among them
  --secret-file <f>   the chain's shared secret (or set CHAINCHAT_SECRET)
`

function ask (peer: PeerSocket, msg: PeerMessage, timeoutMs: number): Promise<PeerMessage> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no answer')), timeoutMs)
    peer.once('message', (m: PeerMessage) => { clearTimeout(timer); resolve(m) })
    peer.once('close', () => { clearTimeout(timer); reject(new Error('closed')) })
    peer.send(msg)
  })
}

export async function main (argv: string[]): Promise<void> {
  let parsed
  try {
    parsed = parseArgs({ args: argv, allowPositionals: true, options: { servers: { type: 'string' }, 'secret-file': { type: 'string' }, help: { type: 'boolean', short: 'h' } } })
  } catch (e) {
    process.stderr.write(`chainchat-admin: ${(e as Error).message}\n\n${usage}`)
    process.exit(2)
  }
  const { values, positionals } = parsed
  if (values.help) {
    process.stdout.write(usage)
    return
  }
  if (positionals[0] !== 'remove' || positionals.length !== 2 || !values.servers) {
    process.stderr.write(usage)
    process.exit(2)
  }
  const member = positionals[1]
  const secret = values['secret-file'] ? fs.readFileSync(values['secret-file'], 'utf8').trim() : process.env.CHAINCHAT_SECRET ?? ''
  for (const server of values.servers.split(',')) {
    let peer: PeerSocket | null = null
    try {
      peer = await connectPeer('admin', server, secret, 2000)
      const info = (await ask(peer, { t: 'probe' }, 2000)).info as { role: string }
      peer.close()
      if (info.role !== 'primary') continue
      peer = await connectPeer('admin', server, secret, 2000)
      const reply = await ask(peer, { t: 'remove', member }, 5000)
      if (reply.t === 'removed') {
        process.stdout.write(`removed ${member}; the chain is now ${(reply.chain as string[]).join(' -> ')} (epoch ${String(reply.epoch)})\n`)
        return
      }
      process.stderr.write(`chainchat-admin: not removed: ${String(reply.why)}\n`)
      process.exit(1)
    } catch (e) {
      process.stderr.write(`chainchat-admin: ${server}: ${(e as Error).message}\n`)
    } finally {
      peer?.close()
    }
  }
  process.stderr.write('chainchat-admin: no primary found among --servers\n')
  process.exit(1)
}
