#!/usr/bin/env node
// The interactive chainchat client.
import { load } from './load.js'

const { main } = await load('chat')
await main(process.argv.slice(2))
