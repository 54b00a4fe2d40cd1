"""`lazysnap convertd`: the conversion service driven by a registry's push notifications."""
