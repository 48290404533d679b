package org.opensearch.rule;

import org.opensearch.plugins.ExtensiblePlugin;
import org.opensearch.plugins.Plugin;

/**
 * Stand-in for OpenSearch's core rule-framework module, which the 3.4.0 integ-test zip leaves out
 * and no registry publishes. The security plugin extends it, so it must exist for security to
 * load; being empty, it only turns off security's rule-based auto-tagging.
 */
public class RuleFrameworkPlugin extends Plugin implements ExtensiblePlugin {}
