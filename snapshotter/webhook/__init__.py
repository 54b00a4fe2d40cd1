"""The mutating admission webhook (`lazysnap webhook`): pods labelled for acceleration start from the
`_accelerated` copies of their images, on accelerated nodes. `review` decides, `server` serves, `config`
reads the TOML file."""
