"""Built-in stbench plugins, written as a third party would write theirs."""
