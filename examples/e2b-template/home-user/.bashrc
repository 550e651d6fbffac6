# The sandbox's shell: the workspace first.
export PATH="$HOME/.local/bin:$PATH"
cd "$HOME/workspace" 2>/dev/null || true
