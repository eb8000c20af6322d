#!/usr/bin/env node
// `npm start`: a local three-server chain for development (lib/main/start.ts).
import { load } from './load.js'

const { main } = await load('start')
await main(process.argv.slice(2))
