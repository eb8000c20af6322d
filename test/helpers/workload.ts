// A stream of concurrent sends through the client library, with every outcome recorded, and the
// check that every acknowledged send is present exactly once.

import { ChatClient, RequestError } from '../../lib/client.ts'

export interface Outcome { text: string, rid: string, from: string, to: string, status: 'ok' | 'fail' | 'unknown', error?: string }

export interface Workload {
  outcomes: Outcome[]
  acked: () => number
  stop: () => Promise<void>
}

export async function setupUsers (servers: string[], users: string[]): Promise<void> {
  const c = await ChatClient.connect({ servers })
  try {
    for (const u of users) await c.register(u, 'pw')
  } finally {
    c.close()
  }
}

// nClients clients, logged in round-robin as `users`, each sending back to back to the next user.
export async function startSends (servers: string[], users: string[], nClients: number, tag = 'w'): Promise<Workload> {
  const outcomes: Outcome[] = []
  let stopping = false
  const clients = await Promise.all(Array.from({ length: nClients }, async (_, k) => {
    const c = await ChatClient.connect({ servers, requestTimeoutMs: 30_000, failoverTimeoutMs: 30_000, livenessTimeoutMs: 1500 })
    await c.login(users[k % users.length], 'pw')
    return c
  }))
  const loops = clients.map(async (c, k) => {
    const from = users[k % users.length]
    for (let n = 0; !stopping && n < 100_000; n++) {
      const o: Outcome = { text: `${tag}${k}-${n}`, rid: `${tag}${k}-r${n}`, from, to: users[(k + 1) % users.length], status: 'unknown' }
      outcomes.push(o)
      try {
        await c.send(o.to, o.text, o.rid)
        o.status = 'ok'
      } catch (e) {
        o.error = String((e as Error).message)
        if (e instanceof RequestError) o.status = 'fail'
        return
      }
    }
  })
  return {
    outcomes,
    acked: () => outcomes.filter(o => o.status === 'ok').length,
    // Requests still waiting (for a primary that may never come back) end as unknown outcomes.
    stop: async () => {
      stopping = true
      for (const c of clients) c.close()
      await Promise.all(loops)
    }
  }
}

// Every message in every user's mailbox, by text, with how often it appears.
export async function mailboxCounts (servers: string[], users: string[]): Promise<Map<string, number>> {
  const seen = new Map<string, number>()
  const c = await ChatClient.connect({ servers })
  try {
    for (const u of users) {
      await c.login(u, 'pw')
      let before: number | undefined
      for (;;) {
        const page = await c.history({ limit: 1000, before })
        for (const m of page.messages) seen.set(m.text, (seen.get(m.text) ?? 0) + 1)
        if (page.messages.length < 1000) break
        before = page.messages[page.messages.length - 1].id
      }
    }
  } finally {
    c.close()
  }
  return seen
}

// The outcomes that break the rules: acknowledged sends not present exactly once, failed sends
// present, unknown sends present more than once.
export function violations (outcomes: Outcome[], seen: Map<string, number>): string[] {
  const bad: string[] = []
  for (const o of outcomes) {
    const n = seen.get(o.text) ?? 0
    if (o.status === 'ok' && n !== 1) bad.push(`acknowledged ${o.text} present ${n} times`)
    if (o.status === 'fail' && n !== 0) bad.push(`failed ${o.text} (${o.error}) present ${n} times`)
    if (o.status === 'unknown' && n > 1) bad.push(`unknown ${o.text} present ${n} times`)
  }
  return bad
}
