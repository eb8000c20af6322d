#!/usr/bin/env node
// Runs one chainchat server in this very process (no wrapper), so its PID is the server's.
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../lib/main/server.ts')
await main(process.argv.slice(2))
