#!/usr/bin/env node
// chainchat-status: every member of a chain at a glance, and whether the chain is healthy.
import { load } from './load.js'

const { main } = await load('status')
await main(process.argv.slice(2))
