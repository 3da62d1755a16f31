#!/usr/bin/env bash
# What gzip costs nginx (`gzip on`) and portico (`[compression]`), in
# user-space instructions (callgrind) and CPU per request, with the bytes
# each sends (see benches/gzip.py). Installs what it needs from Debian and
# builds portico as benches/instructions.sh does. Takes about 5 minutes.
#   bash benches/gzip.sh
BENCH=gzip exec bash "$(dirname "$0")/instructions.sh" "$@"
