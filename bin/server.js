#!/usr/bin/env node
// Runs one chainchat server in this very process (no wrapper), so its PID is the server's.
import { load } from './load.js'

const { main } = await load('server')
await main(process.argv.slice(2))
