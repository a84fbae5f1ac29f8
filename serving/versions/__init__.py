"""Which version each alias serves: the registry (publish, promote, rollback, the probe that
gates them) and the control topic that carries those changes to every replica."""
