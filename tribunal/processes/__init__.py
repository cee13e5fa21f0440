"""Running processes: the children a supervisor starts and watches (``children``) and the
embedded valkey (``embedded``). Only the application's wing uses them; the stages never
start a process."""
