"""The operator's console: the `tbmesh` command, its status screen, launchd and the demo."""
