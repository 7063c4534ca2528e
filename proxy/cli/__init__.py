"""The one `vcache` command: its parser, its settings and its subcommands.

`main` builds the parser and dispatches; `config` reads the settings (flags over environment
over TOML file); `store_commands` (ls, stats, rm, gc, verify), `warm_command` (warm) and
`pack_commands` (export, import) are the subcommands beside `serve`, which runs `proxy.serve`.
"""
